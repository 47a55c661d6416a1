"""The detector's model passes against an independent full-logits reference, draws, inputs, refusals.

The selection rule and the chunked entropy are tested in tests/test_loss_select.py and
tests/test_loss_entropy.py; here the question is whether the detector feeds them the right numbers:
the response teacher-forced under the original image and under exactly the recorded removing view,
per example, whatever the batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cppo.detect import (
    DetectError,
    Example,
    PerceptionDetector,
    ResponseTooLongError,
    select_perception_tokens,
    token_entropy,
)
from cppo.models import append_responses, encode_images, encode_prompts, response_logits
from cppo.perturb import get_perturbation
from tests.helpers import shapes_items, tiny_model_and_processor


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_processor(seed=3)


def _examples(processor, n=3, seed=0):
    """Given responses of different lengths (ids, text, ids), so rows are padded differently."""
    tok = processor.tokenizer
    out = []
    for i, it in enumerate(shapes_items(n, seed=seed)):
        text = f"<think>{it.reasoning}</think> \\boxed{{{it.answer}}}" + " ok" * i
        resp = text if i % 2 else tok(text, add_special_tokens=False)["input_ids"]
        out.append(Example([it.image], it.question, resp, name=f"item{i}"))
    return out


def _reference(model, processor, ex: Example, ids: list[int], views: list[list[dict]], temperature: float):
    """(H(I) (T,), H(I-) per draw (K, T)) from the model's full logits, one example alone."""
    batch = encode_prompts(processor, [ex.prompt], [ex.images])
    rid = torch.tensor([ids])
    inputs = append_responses(batch, rid, torch.ones_like(rid, dtype=torch.bool))
    h = token_entropy(response_logits(model, inputs).float() / temperature)[0]  # (T,)
    per_draw = []
    for recs in views:
        imgs = [get_perturbation(r["name"]).apply(im, r["params"]) for r, im in zip(recs, ex.images)]
        pix, _ = encode_images(processor, [imgs])
        per_draw.append(token_entropy(response_logits(model, inputs, pix).float() / temperature)[0])
    return h, torch.stack(per_draw)


@torch.no_grad()
def test_detector_matches_full_logits_reference_per_example(tiny):
    model, processor = tiny
    examples = _examples(processor)
    # seed 6: each example's two draws are far apart (two nearby zoom-crop windows can differ by less
    # than the margin below on this tiny model)
    det = PerceptionDetector(model, processor, draws=2, temperature=0.7, batch_size=3, chunk_size=4, seed=6)
    results = det.detect(examples, progress=False)
    assert [r.index for r in results] == [0, 1, 2]
    assert len({len(r.token_ids) for r in results}) == 3  # three lengths: padding was exercised
    for ex, r in zip(examples, results):
        h, hm = _reference(model, processor, ex, r.token_ids, r.views, temperature=0.7)
        # the signal is far above the tolerance, and the two draws differ: a pass under the wrong
        # image, or views swapped between draws, would fail below
        assert (hm - h).abs().max() > 50 * 2e-5 and (hm[0] - hm[1]).abs().max() > 50 * 2e-5
        torch.testing.assert_close(r.entropy, h, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r.draw_shifts, hm - h, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r.shift, (hm - h).mean(0), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r.shift_std, (hm - h).std(0), atol=2e-5, rtol=1e-4)
        ref_mask = select_perception_tokens(h[None], hm.mean(0)[None], torch.ones(1, len(h)), 0.5)[0]
        assert torch.equal(r.selected, ref_mask)
        # the perturbed images the detector hands out are the recorded views
        for recs, imgs in zip(r.views, r.perturbed_images):
            replay = get_perturbation(recs[0]["name"]).apply(ex.images[0], recs[0]["params"])
            assert np.array_equal(np.asarray(replay), np.asarray(imgs[0]))
    # two draws are two different views
    assert results[0].views[0] != results[0].views[1]


@torch.no_grad()
def test_batching_does_not_change_the_result_and_text_equals_ids(tiny):
    model, processor = tiny
    examples = _examples(processor)
    a = PerceptionDetector(model, processor, batch_size=3, compute_kl=True).detect(examples, progress=False)
    b = PerceptionDetector(model, processor, batch_size=1, compute_kl=True).detect(examples, progress=False)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.views == y.views  # views depend on the index, not the batch
        torch.testing.assert_close(x.entropy, y.entropy, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x.shift, y.shift, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x.kl, y.kl, atol=1e-4, rtol=1e-4)
        assert bool((x.kl >= -1e-6).all())
    # example 1 gave text, example 0 ids: the same text gives the same ids
    tok = processor.tokenizer
    assert a[1].token_ids == tok(examples[1].response, add_special_tokens=False)["input_ids"]
    assert a[1].response_text == examples[1].response


@torch.no_grad()
def test_other_selectors_from_the_same_statistics(tiny):
    model, processor = tiny
    ex = _examples(processor, n=1)
    r = PerceptionDetector(model, processor, selector="kl_shift", top_percent=0.3).detect(ex, progress=False)[
        0
    ]
    assert r.kl is not None
    # kl_shift selects the top 30 % of tokens with KL > 0 (ties included)
    k = max(1, int(np.floor(0.3 * int((r.kl > 0).sum()) + 1e-9)))
    assert int(r.selected.sum()) >= k and bool(r.kl[r.selected].min() >= r.kl[~r.selected].max())
    score, sel = r.select("entropy", 0.2)
    assert torch.equal(score, r.entropy)
    assert int(sel.sum()) >= max(1, int(0.2 * len(r.token_ids)))
    assert r.entropy[sel].min() >= r.entropy[~sel].max()


@torch.no_grad()
def test_generated_response_is_deterministic_and_ends_with_its_end_token(tiny):
    model, processor = tiny
    it = shapes_items(2, seed=4)
    exs = [Example([i.image], i.question) for i in it]
    kw = dict(max_new_tokens=12, seed=11, batch_size=2)
    a = PerceptionDetector(model, processor, **kw).detect(exs, progress=False)
    b = PerceptionDetector(model, processor, **kw).detect(exs, progress=False)
    c = PerceptionDetector(model, processor, **{**kw, "seed": 12}).detect(exs, progress=False)
    assert all(r.generated for r in a)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.views for r in a] != [r.views for r in c]
    end = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for r in a:
        assert 1 <= len(r.token_ids) <= 12
        assert len(r.token_ids) == 12 or r.token_ids[-1] in end


def test_perturbation_forces_one_entry_and_several_images_each_get_a_view(tiny):
    model, processor = tiny
    it = shapes_items(2, seed=6)
    ex = Example([it[0].image, it[1].image], "Which image has more shapes?", "<think>x</think> \\boxed{1}")
    r = PerceptionDetector(model, processor, perturbation="occlusion_mean", draws=3).detect(
        [ex], progress=False
    )[0]
    assert [[v["name"] for v in d] for d in r.views] == [["occlusion_mean"] * 2] * 3
    assert r.views[0][0]["params"] != r.views[0][1]["params"]
    assert r.draw_shifts.shape == (3, len(r.token_ids))


def test_refusals_name_what_is_wrong(tiny):
    model, processor = tiny
    it = shapes_items(1)[0]
    det = PerceptionDetector(model, processor)
    limit = det.limit
    with pytest.raises(DetectError, match="prompt is empty"):
        det.detect([Example([it.image], "  ")])
    with pytest.raises(DetectError, match="no image"):
        det.detect([Example([], "What?")])
    with pytest.raises(DetectError, match="response is empty"):
        det.detect([Example([it.image], "What?", "")])
    with pytest.raises(DetectError, match="outside the vocabulary"):
        det.detect([Example([it.image], "What?", [1, 10**6])])
    with pytest.raises(ResponseTooLongError, match=f"limit of {limit}"):
        det.detect([Example([it.image], "What?", [5] * limit)])
    # fits alone, not with the prompt: refused when the batch is encoded, before any model pass
    with pytest.raises(ResponseTooLongError, match=r"prompt \(\d+\) \+ response"):
        det.detect([Example([it.image], "What?", [5] * (limit - 5))])
    with pytest.raises(DetectError, match="is preserving"):
        PerceptionDetector(model, processor, perturbation="rotate")
    with pytest.raises(DetectError, match="unknown selector"):
        PerceptionDetector(model, processor, selector="nope")
