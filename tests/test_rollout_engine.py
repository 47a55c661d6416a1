"""The rollout engine (cppo/models/rollout_engine.py) against transformers' `generate` on the same
prompts repeated G times (cppo.models.generate_responses): greedy responses identical, sampled
responses' teacher-forced log-probs equal to the engine's own, per-prompt seeds independent of the
batch, one prefill per prompt and decode rows that follow the tokens actually generated.

The tiny model's end token gets a bias on its logit (`ends_spread`), so that responses end at very
different lengths (a random tiny model otherwise rarely ends); prompts with and without an image
share each call."""

import pytest
import torch

from cppo.batching import take_rows
from cppo.models import append_responses, encode_prompts, generate_responses, response_logits
from cppo.models.rollout_engine import sample_groups
from cppo.rl.config import ConfigError, TrainConfig
from tests.helpers import demo_model_and_processor, shapes_items, tiny_model_and_processor

G = 3


def ends_spread(processor, bias: float):
    """A fresh tiny model whose output head has a bias of `bias` on `<|im_end|>` (weights still tied)."""
    model, _ = tiny_model_and_processor(seed=0)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[processor.tokenizer.convert_tokens_to_ids("<|im_end|>")] = bias
    model.lm_head = biased
    return model


@pytest.fixture(scope="module")
def setting():
    """(processor, batch of 6 prompts: images on the even ones, none on the odd ones)."""
    _, processor = tiny_model_and_processor(seed=0)
    items = shapes_items(6, seed=1)
    images = [[it.image] if i % 2 == 0 else [] for i, it in enumerate(items)]
    return processor, encode_prompts(processor, [it.question for it in items], images)


def lengths(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Each row's response length: its last masked-in column + 1."""
    cols = torch.arange(mask.shape[1]).expand_as(mask)
    return (torch.where(mask, cols, -1).amax(1) + 1).tolist()


def repeated(model, batch, rows):
    return take_rows(batch, rows, model.config.image_token_id)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_responses_are_generates(setting, penalty):
    """Greedy, 6 prompts (3 with an image, 3 without) x G = 3: the engine's ids and masks are those of
    `generate` on the 18 repeated rows, on a model whose greedy responses end at spread lengths; with
    and without a repetition penalty (over the prompt's and the response's ids, as transformers')."""
    processor, batch = setting
    model = ends_spread(processor, 1.5)
    kw = dict(max_new_tokens=40, do_sample=False, repetition_penalty=penalty)
    ids, mask = sample_groups(model, processor, batch, G, **kw)
    hf_ids, hf_mask = generate_responses(
        model, processor, repeated(model, batch, [b for b in range(6) for _ in range(G)]), **kw
    )
    assert torch.equal(ids, hf_ids) and torch.equal(mask, hf_mask)
    ends = lengths(ids, mask)[::G]
    assert min(ends) < 30 and len(set(ends)) >= 3, ends  # ended early, late or never


def test_the_demo_models_greedy_responses_are_generates():
    """The bundled demo model (trained: it ends its responses itself), 4 prompts x 2."""
    model, processor = demo_model_and_processor()
    items = shapes_items(4, seed=3)
    batch = encode_prompts(processor, [it.question for it in items], [[it.image] for it in items])
    kw = dict(max_new_tokens=48, do_sample=False)
    ids, mask = sample_groups(model, processor, batch, 2, **kw)
    hf = generate_responses(
        model, processor, repeated(model, batch, [b for b in range(4) for _ in range(2)]), **kw
    )
    assert torch.equal(ids, hf[0]) and torch.equal(mask, hf[1])
    assert len(set(lengths(ids, mask))) > 1 and max(lengths(ids, mask)) < 48  # ended, not all at once


def test_sampled_logprobs_are_the_teacher_forced_ones(setting):
    """Sampled at temperature 0.7: the engine's log-prob of each token is what teacher forcing the
    prompt + response gives (log_softmax of the logits / 0.7), within 1e-5, rows of every length."""
    processor, batch = setting
    model = ends_spread(processor, 3.0)
    ids, mask, logp = sample_groups(model, processor, batch, G, max_new_tokens=30, temperature=0.7,
                                    generator_seed=3, return_logprobs=True)  # fmt: skip
    ends = lengths(ids, mask)
    assert min(ends) <= 5 and max(ends) >= 20, ends
    rows = repeated(model, batch, [b for b in range(6) for _ in range(G)])
    with torch.no_grad():
        logits = response_logits(model, append_responses(rows, ids, mask))  # (N, T, V)
    forced = (logits.float() / 0.7).log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    # a generated vision token is masked out and replaced by padding (cppo.models.inputs), which changes
    # the context of the tokens after it: those rows are left out
    whole = torch.tensor([bool(m[:t].all()) for m, t in zip(mask, ends)])  # (N,)
    assert mask[whole].sum() > 100 and whole.sum() >= 12
    torch.testing.assert_close(logp[whole][mask[whole]], forced[whole][mask[whole]], atol=1e-5, rtol=0)
    assert (logp[~mask] == 0).all()


def test_per_prompt_seeds_do_not_depend_on_the_batch(setting):
    """Each prompt's group from its own seed: the same responses in one call of 6 prompts, in the
    reverse order, and one prompt per call; and, up to the first end in the group, exactly the draws
    of `generate` with cppo.models.sampling.BlockSampler (today's --seed-per-prompt sampler)."""
    processor, batch = setting
    model = ends_spread(processor, 3.0)
    seeds = [11, 12, 13, 14, 15, 16]
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=50)
    ids, mask = sample_groups(model, processor, batch, G, seeds=seeds, **kw)
    order = [5, 4, 3, 2, 1, 0]
    rev_ids, rev_mask = sample_groups(
        model, processor, repeated(model, batch, order), G, seeds=[seeds[b] for b in order], **kw
    )
    back = [order.index(b) * G + g for b in range(6) for g in range(G)]  # row of (b, g) in the reversed call
    assert torch.equal(rev_mask[back], mask) and torch.equal(rev_ids[back], ids)
    for b in range(6):
        one_ids, one_mask = sample_groups(
            model, processor, repeated(model, batch, [b]), G, seeds=[seeds[b]], **kw
        )
        t = one_ids.shape[1]
        assert torch.equal(ids[b * G : (b + 1) * G, :t], one_ids) and not mask[b * G : (b + 1) * G, t:].any()
    hf_ids, _ = generate_responses(
        model, processor, repeated(model, batch, [b for b in range(6) for _ in range(G)]), seeds=seeds, **kw
    )
    ends = lengths(ids, mask)
    for b in range(6):
        first = min(ends[b * G : (b + 1) * G])  # every row of the group runs for the first `first` tokens
        assert torch.equal(ids[b * G : (b + 1) * G, :first], hf_ids[b * G : (b + 1) * G, :first])
    assert len(set(ends)) > 5  # the groups' rows ended at many different lengths


def test_one_prefill_per_prompt_and_decode_rows_follow_the_tokens(setting):
    """The model's forwards: one prefill of the B = 6 prompts (not the 18 rows), then decode steps whose
    rows add up to the tokens generated: a row of length t is fed for t - 1 steps (its last token is
    never fed), so the decode rows sum to sum(t) - N, not N x (T - 1) as in `generate`."""
    processor, batch = setting
    model = ends_spread(processor, 3.0)
    fed = []
    forward = model.forward
    model.forward = lambda **kw: fed.append(tuple(kw["input_ids"].shape)) or forward(**kw)
    ids, mask = sample_groups(model, processor, batch, G, max_new_tokens=30, generator_seed=5)
    model.forward = forward
    assert fed[0] == tuple(batch["input_ids"].shape)  # (6, L): each prompt once
    ends = lengths(ids, mask)
    assert all(s == 1 for _, s in fed[1:]) and len(fed) - 1 == max(ends) - 1
    assert sum(n for n, _ in fed[1:]) == sum(ends) - len(ends) < 0.7 * len(ends) * (max(ends) - 1)


@pytest.mark.parametrize("seeds", [None, [21, 22, 23, 24, 25, 26]])
def test_the_static_cache_decode_is_the_dynamic_one(setting, seeds):
    """decode="static" (the CUDA-graph path, uncompiled: StaticCache, finished rows kept until 3/4 have
    ended, then cut) gives the dynamic path's responses and log-probs, greedy and seeded."""
    processor, batch = setting
    model = ends_spread(processor, 3.0)
    kw = dict(max_new_tokens=30, return_logprobs=True, seeds=seeds, do_sample=seeds is not None)
    dyn = sample_groups(model, processor, batch, G, **kw)
    static = sample_groups(model, processor, batch, G, decode="static", **kw)
    assert torch.equal(dyn[0], static[0]) and torch.equal(dyn[1], static[1])
    torch.testing.assert_close(dyn[2], static[2], atol=1e-5, rtol=0)
    if seeds is not None:
        assert 4 * sum(t == 30 for t in lengths(dyn[0], dyn[1])) <= len(dyn[0])  # the batch was cut


def test_bad_arguments_say_what_to_change(setting):
    processor, batch = setting
    model = ends_spread(processor, 0.0)
    with pytest.raises(ValueError, match="2 seeds for 6 prompts"):
        sample_groups(model, processor, batch, G, seeds=[1, 2])
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        sample_groups(model, processor, batch, G, decode="cuda-graphs")
    with pytest.raises(ValueError, match="not one of dynamic, static, cuda-graphs"):
        sample_groups(model, processor, batch, G, decode="graphs")
    with pytest.raises(
        ConfigError, match="cppo-graphs runs CUDA graphs: use --rollout-engine cppo on the CPU"
    ):
        TrainConfig(rollout_engine="cppo-graphs", device="cpu")


def test_bench_rollout_runs_on_a_tiny_setting(tmp_path, capsys):
    """bench/bench_rollout.py (docs/benchmarks.md, Rollouts) end to end on a cell small enough for a test."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_rollout

    out = tmp_path / "r.json"
    argv = ["--models", "demo", "--group-sizes", "2", "--caps", "8", "--prompts", "2", "--repeats", "1"]
    assert bench_rollout.main([*argv, "--json", str(out)]) == 0
    [cell] = json.loads(out.read_text())["results"]
    assert cell["rows"] == 4 and cell["image_tokens"] == 16 and cell["ratio"] > 0
    assert "| demo | 16 | 2 | 8 | 4 |" in capsys.readouterr().out
