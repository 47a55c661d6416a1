"""Per-token log-probs and entropies of a response under one view, from one pass.

Both the detector and the trainer score a sampled response by teacher forcing it. This module runs
the model's backbone once, keeps only the hidden states that predict response tokens, and sends
those through the output head in chunks of positions (`cppo.detect.select.chunked_entropy_and_logprob`),
so the (N, T, V) logits of a long response never exist at once and prompt positions never reach
the head (METHOD.md §5.8). Entropy and log-prob come from the same chunk's logits.

Letters: N rows, L prompt columns (left-padded), T response columns, D hidden size, V vocabulary.
"""

from __future__ import annotations

import torch

from cppo.detect.select import chunked_entropy_and_logprob


def backbone_and_head(model):
    """(multimodal backbone, output head) of a Qwen2.5-VL model, through DDP and peft wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return inner.model, inner.lm_head


def response_hidden(model, inputs: dict, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """(N, T, D) hidden states that predict the T response tokens of `append_responses` inputs.

    `pixel_values` replaces the batch's images with a view of the same size (same grids, same ids).
    """
    backbone, _ = backbone_and_head(model)
    L = inputs["prompt_length"]
    fwd = {k: v for k, v in inputs.items() if k != "prompt_length"}
    if pixel_values is not None:
        fwd["pixel_values"] = pixel_values
    T = fwd["input_ids"].shape[1] - L
    hidden = backbone(**fwd, use_cache=False).last_hidden_state  # (N, L+T, D)
    return hidden[:, L - 1 : L - 1 + T]  # (N, T, D): column L-1+t predicts response token t


def response_stats(
    model,
    inputs: dict,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 256,
    pixel_values: torch.Tensor | None = None,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy (N, T), logprob (N, T)) of the response tokens under one view, float32.

    Both are 0 outside `response_mask`. The log-prob carries the gradient; the entropy is detached
    (it only ranks tokens) unless `entropy_grad` (PAPO's entropy regulariser needs it). Logits are
    divided by `temperature` (METHOD.md §5.6).
    """
    _, head = backbone_and_head(model)
    hidden = response_hidden(model, inputs, pixel_values)  # (N, T, D)
    mask = response_mask.to(hidden.device).bool()
    targets = response_ids.to(hidden.device)
    return chunked_entropy_and_logprob(
        hidden,
        head,
        targets,
        temperature=temperature,
        chunk_size=chunk_size,
        mask=mask,
        entropy_grad=entropy_grad,
    )
