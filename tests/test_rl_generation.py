"""Rollout generation in batches of rows (cppo/rl/generation.py, cppo/models/sampling.py): the size
of a call, and samples that do not depend on it when each group has its own seed, with either
engine (`--rollout-engine`; the engine itself: tests/test_rollout_engine.py)."""

import pytest
import torch

from cppo.batching import take_rows
from cppo.models import encode_prompts, generate_responses
from cppo.models.rollout_engine import sample_groups
from cppo.perturb import get_preset
from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.data import open_dataset
from cppo.rl.generation import (
    CPU_GENERATION_ROWS,
    agreed_rows,
    free_device_memory,
    generation_rows,
    memory_sized_rows,
)
from cppo.rl.memory import SHAPES, ModelShape
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts, prepare_prompts
from tests.helpers import shapes_batch, shapes_dataset, tiny_model_and_processor

KW = dict(max_new_tokens=12, temperature=0.9, top_p=0.95, top_k=50)


def test_a_seeded_block_draws_what_its_group_draws_alone():
    """Three groups of 3 in one call, each from its own seed, sample exactly what each group samples
    alone after torch.manual_seed(seed) through transformers' own sampler (the --seed-per-prompt
    path before generation batches)."""
    model, processor = tiny_model_and_processor()
    _, batch = shapes_batch(processor, n=3, seed=3)
    token = model.config.image_token_id
    G, seeds = 3, [100, 101, 102]
    together = take_rows(batch, [b for b in range(3) for _ in range(G)], token)
    ids, mask = generate_responses(model, processor, together, seeds=seeds, **KW)
    for b, seed in enumerate(seeds):
        alone_ids, alone_mask = generate_responses(
            model, processor, take_rows(batch, [b] * G, token), generator_seed=seed, **KW
        )
        t = alone_ids.shape[1]
        assert torch.equal(mask[b * G : (b + 1) * G, :t], alone_mask)
        assert not mask[b * G : (b + 1) * G, t:].any()
        assert torch.equal(ids[b * G : (b + 1) * G, :t][alone_mask], alone_ids[alone_mask])
    with pytest.raises(ValueError, match="equal blocks"):
        generate_responses(model, processor, together, seeds=[1, 2], **KW)


def _rollouts(model, processor, samples, seeds, **cfg_kw):
    cfg = TrainConfig(algo="grpo", group_size=2, prompts_per_step=len(samples), max_new_tokens=10, beta=0.0,
                      micro_batch_size=2, **cfg_kw)  # fmt: skip
    return collect_rollouts(
        model, processor,
        prepare_prompts(processor, samples, list(range(len(samples))), cfg.algo, get_preset("paper")), cfg,
        RewardScorer(cfg.rewards, cfg.reward_weights), generator_seed=7, per_prompt_seeds=seeds,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model, processor = tiny_model_and_processor(seed=2)
    ds = open_dataset(shapes_dataset(tmp_path_factory.mktemp("data"), n=4)["train"])
    return model, processor, [ds[i] for i in range(4)]


@pytest.mark.parametrize("engine", ["cppo", "hf"])
def test_samples_with_per_prompt_seeds_do_not_depend_on_the_generation_batch_size(
    setting, engine, monkeypatch
):
    """Both engines: the rows of each call (the engine is handed each prompt once and makes its G rows;
    `generate` the repeated rows), each call cut to its own longest prompt, and the same samples
    whatever the number of calls."""
    import cppo.rl.generation as generation

    model, processor, samples = setting
    calls = []  # (rows generated, prompt columns) of each call
    for name in ("sample_groups", "generate_responses"):
        real = getattr(generation, name)

        def recording(m, p, call, *args, _real=real, **kw):
            out = _real(m, p, call, *args, **kw)
            calls.append((out[0].shape[0], call["input_ids"].shape[1]))
            return out

        monkeypatch.setattr(generation, name, recording)
    outs = {
        rows: _rollouts(
            model, processor, samples, [11, 12, 13, 14], generation_batch_size=rows, rollout_engine=engine
        )
        for rows in (2, 5, 8)  # a group per call; 2 groups (5 rounds down); all 4 in one call
    }
    assert [rows for rows, _ in calls] == [2, 2, 2, 2, 4, 4, 8]
    lengths = [int(x.sum()) for x in outs[8].inputs["attention_mask"][::2, : outs[8].inputs["prompt_length"]]]
    assert len(set(lengths)) > 1  # prompts of different lengths: the calls were padded differently
    assert calls[0][1] == lengths[0] < max(lengths)  # each call cut to its own longest prompt
    for rows in (2, 5):
        assert torch.equal(outs[rows].response_mask, outs[8].response_mask)
        assert torch.equal(outs[rows].response_ids, outs[8].response_ids)
        assert outs[rows].texts == outs[8].texts


@pytest.mark.parametrize("engine", ["cppo", "hf"])
def test_one_stream_without_per_prompt_seeds(setting, engine):
    """Without per-prompt seeds one call is the one-call trainer's sampling (torch.manual_seed of the
    generator seed, then the engine's sampler, or transformers' for `hf`); smaller calls continue the
    stream, so they draw other samples from the same policy."""
    model, processor, samples = setting
    whole = _rollouts(model, processor, samples, None, rollout_engine=engine)  # 8 rows <= 64: one call
    batch = encode_prompts(processor, [s.question for s in samples], [s.images for s in samples])
    cfg = TrainConfig(max_new_tokens=10)
    kw = dict(
        generator_seed=7, max_new_tokens=10, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k
    )
    if engine == "hf":
        rows = take_rows(batch, [b for b in range(4) for _ in range(2)], model.config.image_token_id)
        ids, mask = generate_responses(model, processor, rows, **kw)
    else:
        ids, mask = sample_groups(model, processor, batch, 2, **kw)
    assert torch.equal(whole.response_mask, mask) and torch.equal(whole.response_ids, ids)
    split = _rollouts(model, processor, samples, None, generation_batch_size=2, rollout_engine=engine)
    assert not torch.equal(split.response_ids[2:], whole.response_ids[2:])


def test_generation_rows_is_configured_sized_from_memory_or_the_cpu_default():
    model, _ = tiny_model_and_processor()
    cfg = TrainConfig(group_size=5, max_new_tokens=100)
    assert generation_rows(model, cfg, 50) == CPU_GENERATION_ROWS // 5 * 5  # whole groups
    cfg.generation_batch_size = 12
    assert generation_rows(model, cfg, 50) == 10
    cfg.generation_batch_size = 3
    assert generation_rows(model, cfg, 50) == 5  # at least one group
    with pytest.raises(ConfigError, match="generation_batch_size must be >= 1"):
        TrainConfig(generation_batch_size=0)
    # 3B in bf16: 36 KiB of KV cache per token, 4,608 tokens a row (162 MiB): 100 GiB free -> capped
    row = SHAPES["3b"].kv_bytes_per_token(2) * (512 + 4096)
    assert row == 36 * 1024 * 4608
    assert memory_sized_rows(100 * 2**30, row) == 256
    assert memory_sized_rows(20 * 2**30, row) == 63  # 10 GiB for the cache


def test_free_memory_is_read_after_the_allocator_returns_its_cache(monkeypatch):
    """On CUDA the free bytes are read after `torch.cuda.empty_cache()` (otherwise the update's cached
    peak reads as used); off CUDA nothing is read (None: the CPU default applies)."""
    order = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: order.append("empty_cache"))
    free_total = (7 * 2**30, 80 * 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: order.append("mem_get_info") or free_total)
    assert free_device_memory(torch.device("cpu")) is None and order == []
    assert free_device_memory(torch.device("cuda", 0)) == 7 * 2**30
    assert order == ["empty_cache", "mem_get_info"]


def test_memory_sized_rows_on_a_faked_cuda_device(monkeypatch):
    """The CUDA path end to end on the CPU (compute device and memory reading faked): the tiny model's
    bf16 KV cache is 2 (K, V) x 2 layers x 2 KV heads x 32 dims x 2 bytes = 512 bytes a token, so a row
    of 50 prompt + 100 new tokens takes 76,800 bytes; 1,000,000 bytes free: 500,000 // 76,800 = 6
    rows, 5 as whole groups of 5. One process: no agreement to make (`agreed_rows` returns its own)."""
    import cppo.rl.generation as generation

    model, _ = tiny_model_and_processor()
    monkeypatch.setattr(generation, "compute_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1_000_000, 2_000_000))
    assert ModelShape.from_config(model.config).kv_bytes_per_token(2) == 512
    assert generation_rows(model, TrainConfig(group_size=5, max_new_tokens=100), 50) == 5
    assert generation_rows(model, TrainConfig(group_size=2, max_new_tokens=100), 50) == 6
    assert agreed_rows(6) == 6


def test_generate_is_told_not_to_sync_processes(monkeypatch):
    """`synced_gpus=False` reaches `model.generate`: transformers would otherwise turn it on for an
    FSDP-managed model (one all-reduce per new token; tests/test_fsdp_generation.py)."""
    model, processor = tiny_model_and_processor()
    _, batch = shapes_batch(processor, n=1, seed=3)
    seen = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["synced_gpus"]) or generate(**kw))
    generate_responses(model, processor, batch, **KW)
    assert seen == [False]


def test_the_default_config_rolls_out_with_the_engine(setting, monkeypatch):
    """No --rollout-engine: every call goes to cppo.models.rollout_engine.sample_groups, none to generate."""
    import cppo.rl.generation as generation

    assert TrainConfig().rollout_engine == "cppo"
    calls = []
    real = generation.sample_groups
    monkeypatch.setattr(generation, "sample_groups", lambda *a, **k: calls.append("engine") or real(*a, **k))
    monkeypatch.setattr(generation, "generate_responses", lambda *a, **k: calls.append("generate"))
    model, processor, samples = setting
    _rollouts(model, processor, samples, None)
    assert calls and set(calls) == {"engine"}
