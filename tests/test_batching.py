import pytest
import torch

from cppo.batching import images_per_row, split_images, take_rows

PAD = 9  # the <|image_pad|> id in these made-up rows


def _batch():
    # Row 0: one image of grid (1, 2, 4) -> 8 patches, 2 pad tokens.
    # Row 1: no image (text only).
    # Row 2: two images, grids (1, 2, 2) -> 4 patches / 1 pad and (1, 4, 4) -> 16 patches / 4 pads.
    ids = torch.tensor([
        [0, 0, 0, 5, PAD, PAD, 6, 7],
        [0, 0, 0, 0, 0, 1, 2, 3],
        [5, PAD, 6, 5, PAD, PAD, PAD, PAD],
    ])
    grid = torch.tensor([[1, 2, 4], [1, 2, 2], [1, 4, 4]])
    pix = torch.arange(28, dtype=torch.float32).unsqueeze(1).expand(28, 4).clone()  # patch k holds k
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "pixel_values": pix,
            "image_grid_thw": grid, "extra": "kept"}


def test_images_per_row_and_split():
    b = _batch()
    counts = images_per_row(b["input_ids"], b["image_grid_thw"], PAD)
    assert counts == [1, 0, 2]
    per_row = split_images(b["pixel_values"], b["image_grid_thw"], counts)
    assert per_row[0][0][:, 0].tolist() == list(range(0, 8))
    assert per_row[1][0].shape == (0, 4)
    assert per_row[2][0][:, 0].tolist() == list(range(8, 28))
    assert per_row[2][1].tolist() == [[1, 2, 2], [1, 4, 4]]


def test_take_rows_reorders_images_with_rows():
    b = _batch()
    sub = take_rows(b, [2, 0], PAD)
    assert sub["input_ids"].tolist() == [b["input_ids"][2].tolist(), b["input_ids"][0].tolist()]
    assert sub["pixel_values"][:, 0].tolist() == list(range(8, 28)) + list(range(0, 8))
    assert sub["image_grid_thw"].tolist() == [[1, 2, 2], [1, 4, 4], [1, 2, 4]]
    assert sub["extra"] == "kept"
    # Taking every row in order gives the batch back.
    full = take_rows(b, [0, 1, 2], PAD)
    assert torch.equal(full["pixel_values"], b["pixel_values"])
    # A text-only row alone has no image tensors at all.
    assert "pixel_values" not in take_rows(b, [1], PAD)


def test_truncated_image_tokens_are_refused():
    b = _batch()
    b["input_ids"][0, 5] = 7  # drop one of row 0's two pad tokens
    with pytest.raises(ValueError, match="row 0"):
        images_per_row(b["input_ids"], b["image_grid_thw"], PAD)
