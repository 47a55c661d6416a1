"""Row selection for Qwen2.5-VL batches, whose images are not stored per row.

The processor returns ``pixel_values`` as ONE ``(patches, 1176)`` tensor for the whole batch and
``image_grid_thw`` as one ``(images, 3)`` tensor, in the order the images appear in the rows.
Micro-batching, and running a view only on the rows that need it (docs/method.md §5.7), must therefore
cut those tensors by row. A row's images are found from its ``<|image_pad|>`` tokens: an image of
grid ``(t, h, w)`` has ``t·h·w`` patches and ``t·h·w / merge²`` pad tokens.

A sub-batch keeps the columns of the whole batch; `trim_prompt` and `trim_padding` cut it to its own
rows' longest prompt and response (micro-batches of the update, generation batches).

Letters: N rows, L sequence length, P patches, I images, D = 1176 (3·2·14·14) patch features.
"""

from __future__ import annotations

import torch

ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def images_per_row(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token_id: int, merge_size: int = 2
) -> list[int]:
    """How many of the batch's images (in order) belong to each row.

    input_ids: (N, L); image_grid_thw: (I, 3). Raises when the pad tokens do not add up to whole
    images, which means a prompt was truncated through its image tokens.
    """
    pads_per_row = (input_ids == image_token_id).sum(dim=1).tolist()  # (N,)
    pads_per_image = (image_grid_thw.prod(dim=1) // (merge_size**2)).tolist()  # (I,)
    counts, image = [], 0
    for row, pads in enumerate(pads_per_row):
        n = 0
        while pads > 0:
            if image >= len(pads_per_image):
                raise ValueError(f"row {row} has more <|image_pad|> tokens than the batch has images")
            pads -= pads_per_image[image]
            image += 1
            n += 1
        if pads != 0:
            raise ValueError(f"row {row}: image tokens do not add up to whole images (truncated prompt?)")
        counts.append(n)
    if image != len(pads_per_image):
        raise ValueError(f"{len(pads_per_image) - image} image(s) have no <|image_pad|> tokens in any row")
    return counts


def split_images(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, counts: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (its patches (P_row, D), its grids (I_row, 3)), given `images_per_row` counts."""
    patches = image_grid_thw.prod(dim=1)  # (I,)
    image_start = [0]
    for c in counts:
        image_start.append(image_start[-1] + c)
    patch_start = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()  # (I+1,)
    out = []
    for row in range(len(counts)):
        i0, i1 = image_start[row], image_start[row + 1]
        out.append((pixel_values[patch_start[i0] : patch_start[i1]], image_grid_thw[i0:i1]))
    return out


def join_images(
    per_row: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Concatenate per-row (patches, grids) back into batch tensors; (None, None) when no row has images."""
    pix = [p for p, _ in per_row if p.shape[0] > 0]
    grids = [g for _, g in per_row if g.shape[0] > 0]
    if not pix:
        return None, None
    return torch.cat(pix, dim=0), torch.cat(grids, dim=0)


def take_rows(batch: dict, rows: list[int] | torch.Tensor, image_token_id: int, merge_size: int = 2) -> dict:
    """The sub-batch of `rows` (in the order given): per-row tensors indexed, images cut and joined.

    Any other (N, ...) tensor in `batch` whose first dimension is N is indexed too; non-tensor
    values are passed through.
    """
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    n = batch["input_ids"].shape[0]
    out = {}
    for key, value in batch.items():
        if key in ("pixel_values", "image_grid_thw"):
            continue
        if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[rows_t.to(value.device)]
        else:
            out[key] = value
    if batch.get("pixel_values") is not None:
        counts = images_per_row(batch["input_ids"], batch["image_grid_thw"], image_token_id, merge_size)
        per_row = split_images(batch["pixel_values"], batch["image_grid_thw"], counts)
        pix, grid = join_images([per_row[r] for r in rows_t.tolist()])
        if pix is not None:
            out["pixel_values"], out["image_grid_thw"] = pix, grid
    return out


def trim_prompt(batch: dict) -> dict:
    """A left-padded batch without its leading columns that are padding in every row.

    The row keys (`ROW_KEYS`) lose those columns; images and everything else pass through. Qwen2.5-VL
    computes its (M-RoPE) positions from the attention mask, so the kept tokens keep their
    positions, and no image token is ever padding."""
    first = int(batch["attention_mask"].any(0).long().argmax())  # first column some row attends to
    if first == 0:
        return dict(batch)
    return {k: v[:, first:] if k in ROW_KEYS and torch.is_tensor(v) else v for k, v in batch.items()}


def trim_padding(inputs: dict, response_mask: torch.Tensor) -> tuple[dict, int]:
    """(inputs, T'): teacher-forcing inputs (prompt + response, `prompt_length` L) cut to their own
    rows' tokens, and the response columns kept.

    Drops the leading prompt columns that are padding in every row (as `trim_prompt`, L shrinks by
    as many) and the response columns after the last one any row's `response_mask` (n, T) keeps:
    those are padding in every row (the attention mask ends at each row's last kept token), and
    under causal attention no later column changes an earlier one. At least one response column
    is kept."""
    L = inputs["prompt_length"]
    kept = response_mask.any(0).nonzero()
    t = max(1, int(kept[-1]) + 1) if kept.numel() else 1
    first = int(inputs["attention_mask"][:, :L].any(0).long().argmax())
    out = {k: v[:, first : L + t] if k in ROW_KEYS and torch.is_tensor(v) else v for k, v in inputs.items()}
    out["prompt_length"] = L - first
    return out, t


def mrope_positions(backbone, batch: dict) -> torch.Tensor:
    """(4, B, S) positions of a left-padded batch, as `generate` builds them: row 0 the text position
    (attended tokens counted from 0, padding 0), rows 1-3 Qwen2.5-VL's M-RoPE (temporal, height,
    width; the multimodal backbone's `get_rope_index`) where any row has an image, else the text
    position three times. `batch` may hold prompt and response columns (the rollout engine's
    prompts; cppo.response_stats.shared_prompt_hidden's teacher-forced rows)."""
    attn = batch["attention_mask"]
    text = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)  # (B, L)
    if batch.get("image_grid_thw") is None:
        vision = text.unsqueeze(0).expand(3, -1, -1)
    else:
        vision, _ = backbone.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=attn,
        )  # (3, B, L); the row's rope_deltas are its last position + 1 - its tokens
    return torch.cat([text.unsqueeze(0), vision.to(text.device)], 0)
