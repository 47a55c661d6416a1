"""A pass without gradient runs each distinct prompt once (cppo.response_stats.shared_prompt_hidden)
and gives the single forward's entropies and log-probs: rows of one prompt adjacent, prompts of
different lengths (left padding), responses of different lengths (right padding), a view's pixels,
prompts with equal ids but other images, text-only rows; on every transformers release accepted
(the floor suite runs this file too)."""

import pytest
import torch

from cppo.batching import take_rows
from cppo.models import append_responses, encode_prompts
from cppo.response_stats import response_stats
from tests.helpers import shapes_items, tiny_model_and_processor

PAD = "<|endoftext|>"


def _rows(model, processor, prompts: list[tuple[str, list]], group: int, lengths: list[int]):
    """Teacher-forcing inputs of `group` adjacent rows per prompt, responses of the given lengths."""
    batch = encode_prompts(processor, [q for q, _ in prompts], [imgs for _, imgs in prompts])
    rows = [b for b in range(len(prompts)) for _ in range(group)]
    batch = take_rows(batch, rows, model.config.image_token_id)
    N, T = len(rows), max(lengths)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200, (N, T), generator=gen)
    mask = torch.arange(T).expand(N, T) < torch.tensor(lengths).unsqueeze(1)  # (N, T)
    ids = ids.masked_fill(~mask, processor.tokenizer.convert_tokens_to_ids(PAD))
    return append_responses(batch, ids, mask), ids, mask


def _both(model, inputs, ids, mask, **kw):
    with torch.no_grad():
        fast = response_stats(model, inputs, ids, mask, 0.8, 5, **kw)
        slow = response_stats(model, inputs, ids, mask, 0.8, 5, share_prompts=False, **kw)
    return fast, slow


def _backbone_rows(model) -> list[int]:
    """The batch size of every backbone (language model) call, recorded by a hook."""
    calls = []
    model.model.language_model.register_forward_hook(
        lambda m, a, kw, o: calls.append(o.last_hidden_state.shape[:2]), with_kwargs=True
    )
    return calls


@pytest.mark.parametrize("group", [1, 3])
def test_shared_prompts_equal_the_single_forward(group):
    model, processor = tiny_model_and_processor()
    items = shapes_items(3, seed=5)
    prompts = [(it.question + " Answer briefly." * k, [it.image]) for k, it in enumerate(items)]  # L differs
    lengths = [(5 + 3 * r) % 11 + 1 for r in range(3 * group)]  # 1 .. 11 tokens, right-padded
    inputs, ids, mask = _rows(model, processor, prompts, group, lengths)
    calls = _backbone_rows(model)
    fast, slow = _both(model, inputs, ids, mask)
    L, T = inputs["prompt_length"], ids.shape[1]
    assert calls == [(3, L), (3 * group, T), (3 * group, L + T)]  # 3 prefills, then the responses
    torch.testing.assert_close(fast[0], slow[0], atol=2e-5, rtol=1e-5)  # entropy
    torch.testing.assert_close(fast[1], slow[1], atol=2e-5, rtol=1e-5)  # log-prob
    assert float(fast[0][mask].abs().min()) > 0 and not fast[1][~mask].any()  # zeros only off the mask


def test_a_views_pixels_and_equal_ids_with_other_images():
    """Two prompts with the same question and other images are two prefills; a view's pixels replace
    the images in the shared pass as in the single one."""
    model, processor = tiny_model_and_processor()
    a, b = shapes_items(2, seed=7)
    prompts = [(a.question, [a.image]), (a.question, [b.image])]  # the same ids
    inputs, ids, mask = _rows(model, processor, prompts, 2, [4, 6, 6, 2])
    calls = _backbone_rows(model)
    fast, slow = _both(model, inputs, ids, mask)
    assert calls[0][0] == 2  # not shared across the two images
    torch.testing.assert_close(fast[1], slow[1], atol=2e-5, rtol=1e-5)
    flipped = inputs["pixel_values"].flip(0)  # another image for each row (same grids)
    fast, slow = _both(model, inputs, ids, mask, pixel_values=flipped)
    torch.testing.assert_close(fast[0], slow[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=2e-5, rtol=1e-5)
    unchanged, _ = _both(model, inputs, ids, mask)
    assert (fast[1] - unchanged[1]).abs().max() > 1e-4  # the view's pixels were used


def test_text_only_rows_share_their_prompt_too():
    model, processor = tiny_model_and_processor()
    prompts = [("What is 2 + 3?", []), ("Name a colour that is not red, please.", [])]
    inputs, ids, mask = _rows(model, processor, prompts, 3, [3, 7, 5, 7, 1, 4])
    calls = _backbone_rows(model)
    fast, slow = _both(model, inputs, ids, mask)
    assert calls[0][0] == 2
    torch.testing.assert_close(fast[0], slow[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], atol=2e-5, rtol=1e-5)


def test_a_pass_with_gradient_runs_every_row_whole():
    """The shared path is for passes without gradient only: with one, each row runs its prompt."""
    model, processor = tiny_model_and_processor()
    (it,) = shapes_items(1, seed=2)
    inputs, ids, mask = _rows(model, processor, [(it.question, [it.image])], 3, [3, 3, 2])
    calls = _backbone_rows(model)
    _, logp = response_stats(model, inputs, ids, mask, 0.8, 5)
    assert logp.requires_grad and calls == [(3, inputs["prompt_length"] + ids.shape[1])]
