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

import torch
from PIL import Image

from cppo.models.processor import flatten_images
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


def _token_ids(tokenizer, tokens) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(response_ids (N, T) long, response_mask (N, T) bool) from `model.generate` on a left-padded batch.

    A response stops at its first end token (kept, mask True); later columns are `<|endoftext|>`
    padding with mask False. A vision token the model generates (`<|image_pad|>`, ...) is masked
    out and replaced by padding in `response_ids`: left in, it would make the next forward pass
    look for image features that do not exist. `generator_seed` seeds torch's global generator
    before sampling (transformers' sampler draws from it).
    """
    tok = processor.tokenizer
    end_ids = _token_ids(tok, END_TOKENS)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=end_ids, pad_token_id=pad_id
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    out = model.generate(**inputs, **kwargs)  # (N, L + T)
    ids = out[:, inputs["input_ids"].shape[1] :].clone()  # (N, T)
    is_end = torch.isin(ids, torch.tensor(end_ids, device=ids.device))
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0  # strictly after the first end token
    is_vision = torch.isin(ids, torch.tensor(_token_ids(tok, VISION_TOKENS), device=ids.device))
    mask = ~after_end & ~is_vision
    ids[after_end | is_vision] = pad_id
    return ids.long(), mask


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
