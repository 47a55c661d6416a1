"""Batches for Qwen2.5-VL: prompts in, responses out, and prompt+response for teacher forcing.

Letters: N prompts (rollouts), L prompt tokens (left-padded), T response tokens, V vocabulary,
P image patches of the whole batch (one (P, 1176) tensor, images in prompt order).

Conventions every caller relies on:
- prompts are left-padded, so every prompt ends at column L-1 and a response starts at column L;
- `mm_token_type_ids` (1 on image pads) travels with every batch: without it Qwen2.5-VL silently
  falls back to 1-D positions instead of M-RoPE;
- a response ends with its end token (`<|im_end|>`, or `<|endoftext|>`), which is part of the
  response and of its mask; everything after it is padding (`<|endoftext|>`, mask False).
"""

from __future__ import annotations

import contextlib

import torch
from PIL import Image
from transformers.generation.logits_process import LogitsProcessorList

from cppo.models.sampling import BlockSampler
from cppo.prompt import INSTRUCTION, build_messages

END_TOKENS = ("<|im_end|>", "<|endoftext|>")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def encode_prompts(
    processor, questions: list[str], images: list[list[Image.Image]], instruction: str | None = INSTRUCTION
) -> dict[str, torch.Tensor]:
    """Left-padded, chat-templated prompts with their images.

    Returns input_ids (N, L), attention_mask (N, L), mm_token_type_ids (N, L), and, when any
    prompt has an image, pixel_values (P, 1176) and image_grid_thw (num_images, 3).
    """
    if len(questions) != len(images):
        raise ValueError(
            f"{len(questions)} questions but {len(images)} image lists: give one list per question"
        )
    texts = [
        processor.apply_chat_template(
            build_messages(q, len(imgs), instruction), add_generation_prompt=True, tokenize=False
        )
        for q, imgs in zip(questions, images)
    ]
    flat = flatten_images(images)
    enc = processor(text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt")
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    return {k: enc[k] for k in keys if k in enc}


def encode_images(processor, images: list[list[Image.Image]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values (P, 1176), image_grid_thw (num_images, 3)) of the images alone, in prompt order.

    Same tensors as `encode_prompts` gives, so a perturbed view of the same size can replace
    `pixel_values` while the token ids are reused.
    """
    out = processor.image_processor(images=flatten_images(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def flatten_images(images) -> list[Image.Image]:
    """One flat list of images from an image, a list, or a list of per-prompt lists."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    flat = []
    for x in images:
        flat.extend(flatten_images(x) if isinstance(x, (list, tuple)) else [x])
    return flat


def _token_ids(tokenizer, tokens) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


@contextlib.contextmanager
def _only_given_settings(model):
    """Inside the block `model.generate` applies only the settings its call passes.

    transformers fills every setting a call leaves unset from the checkpoint's own
    generation_config.json (Qwen2.5-VL-Instruct ships repetition_penalty 1.05, top_k, top_p), so a
    sampler that should be exactly softmax(logits / temperature) would silently be another one. The
    model's generation config is swapped for a blank one (peft's base model included) and restored."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        inner.generation_config = saved


def _refuse_sharded(model, caller: str = "generate_responses") -> None:
    """Raise when `model` holds FSDP shards (DTensor parameters), i.e. it is sharded and not gathered."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise RuntimeError(
            f"{caller} got a sharded model: call it inside cppo.rl.fsdp.gathered(model), "
            "so that generation runs on the gathered weights with no collective per new token"
        )


@torch.no_grad()
def generate_responses(
    model,
    processor,
    batch: dict,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generator_seed: int | None = None,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    return_logprobs: bool = False,
    seeds: list[int] | None = None,
):
    """(response_ids (N, T) long, response_mask (N, T) bool) from `model.generate` on a left-padded batch.

    A response stops at its first end token (kept, mask True); later columns are `<|endoftext|>`
    padding with mask False. A vision token the model generates (`<|image_pad|>`, ...) is masked
    out and replaced by padding in `response_ids`: left in, it would make the next forward pass
    look for image features that do not exist. `generator_seed` seeds torch's global generator
    before sampling (transformers' sampler draws from it).

    Sampling uses exactly the arguments given (temperature, top_p, top_k 0 = off, repetition_penalty
    1 = off) and nothing from the checkpoint's generation_config.json (`_only_given_settings`).
    `return_logprobs`: also the (N, T) float32 log-probability of each sampled token under the
    distribution it was drawn from (0 outside the mask), for checking that sampling and training
    see the same policy.

    `seeds`: one seed per block of N / len(seeds) adjacent rows (e.g. one per prompt's group); each
    block samples from its own generator (`cppo.models.sampling.BlockSampler`), so what it samples
    does not depend on the other rows of the call. `generator_seed` is then not used, and
    `return_logprobs` is not available (the sampler hands `generate` its draws, not its scores).

    A model sharded with FSDP2 must be gathered (`cppo.rl.fsdp.gathered`): generation then needs no
    collective, and `synced_gpus` is off (transformers turns it on for an FSDP-managed model: one
    all-reduce per new token, which hangs when ranks make different numbers of calls). The inputs go
    to the gathered parameters' device, which is the compute device under CPU offload too.
    """
    _refuse_sharded(model)
    tok = processor.tokenizer
    end_ids = _token_ids(tok, END_TOKENS)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=end_ids,
        pad_token_id=pad_id,
        repetition_penalty=repetition_penalty,
        synced_gpus=False,  # no all-reduce per new token under FSDP (docstring)
    )
    if seeds is not None:
        if return_logprobs or not do_sample:
            raise ValueError("seeds samples each block itself: it needs do_sample and no return_logprobs")
        rows = inputs["input_ids"].shape[0]
        if rows % len(seeds):
            raise ValueError(f"{rows} rows cannot be split into {len(seeds)} equal blocks, one per seed")
        sampler = BlockSampler(seeds, rows // len(seeds), temperature, top_k, top_p)
        kwargs.update(do_sample=False, logits_processor=LogitsProcessorList([sampler]))
    elif do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if return_logprobs:
        kwargs.update(output_scores=True, return_dict_in_generate=True)
    if generator_seed is not None and seeds is None:
        torch.manual_seed(generator_seed)
    with _only_given_settings(model):
        out = model.generate(**inputs, **kwargs)  # (N, L + T), or a dict holding it
    seqs = out.sequences if return_logprobs else out
    ids = seqs[:, inputs["input_ids"].shape[1] :].clone()  # (N, T)
    is_end = torch.isin(ids, torch.tensor(end_ids, device=ids.device))
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0  # strictly after the first end token
    is_vision = torch.isin(ids, torch.tensor(_token_ids(tok, VISION_TOKENS), device=ids.device))
    mask = ~after_end & ~is_vision
    if return_logprobs:
        scores = torch.stack(out.scores, 1).float().log_softmax(-1)  # (N, T, V): what was sampled from
        logp = scores.gather(-1, ids.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)  # (N, T)
    ids[after_end | is_vision] = pad_id
    if return_logprobs:
        return ids.long(), mask, logp
    return ids.long(), mask


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one right-padded batch: ids (N, T) long, mask (N, T) bool (True on tokens)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def append_responses(batch: dict, response_ids: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """Model inputs for teacher forcing prompt + response, and the prompt length.

    Returns input_ids (N, L+T), attention_mask (N, L+T), mm_token_type_ids (N, L+T) (zeros on the
    response), pixel_values and image_grid_thw passed through, and "prompt_length" = L (an int:
    pop it before `model(**inputs)`, or use `response_logits`). The logits of response token t
    sit at column L-1+t, so the response's are columns L-1 .. L+T-2.

    The response's attention mask covers every column up to its last masked-in token: padding
    after the end is not attended to, while a masked-out token inside the response (a generated
    vision token, replaced by padding) stays in the context it was generated in.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    N, L = ids.shape
    T = response_ids.shape[1]
    response_ids = response_ids.to(ids.device)
    mask = response_mask.to(ids.device).bool()
    cols = torch.arange(T, device=ids.device).expand(N, T)  # (N, T)
    last = torch.where(mask, cols, torch.full_like(cols, -1)).amax(1, keepdim=True)  # (N, 1)
    response_attn = (cols <= last).to(attn.dtype)  # (N, T)
    mm = batch.get("mm_token_type_ids")
    if mm is None:
        raise ValueError(
            "batch has no mm_token_type_ids: without them Qwen2.5-VL falls back to 1-D positions"
        )
    out = {
        "input_ids": torch.cat([ids, response_ids.to(ids.dtype)], 1),  # (N, L+T)
        "attention_mask": torch.cat([attn, response_attn], 1),  # (N, L+T)
        "mm_token_type_ids": torch.cat([mm, torch.zeros(N, T, dtype=mm.dtype, device=mm.device)], 1),
    }
    for k in ("pixel_values", "image_grid_thw"):
        if k in batch:
            out[k] = batch[k]
    out["prompt_length"] = L
    return out


def response_logits(model, inputs: dict, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, T, V) that predict each response token, from `append_responses`' inputs.

    `pixel_values` replaces the batch's images (a perturbed view of the same size).
    """
    L = inputs["prompt_length"]
    fwd = {k: v for k, v in inputs.items() if k != "prompt_length"}
    if pixel_values is not None:
        fwd["pixel_values"] = pixel_values
    T = fwd["input_ids"].shape[1] - L
    logits = model(**fwd, logits_to_keep=T + 1).logits  # (N, T+1, V): columns L-1 .. L+T-1
    return logits[:, :T]
