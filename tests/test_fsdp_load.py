"""One copy of the weights at load under FSDP (cppo.rl.policy.build_policy with FSDP settings): rank 0
reads the checkpoint, the other ranks build on the meta device and receive their shards. On two CPU
processes (gloo, tests/workers/fsdp_load.py), with a tiny Qwen2.5-VL wide and deep enough (195 MiB
in float32) that its weights dominate a process's memory.

That the first training steps from such a start equal one unsharded process is checked by
tests/test_rl_loop.py::test_two_processes_equal_one_process_on_the_combined_batch[fsdp2], and the
sharded reference's log-probs and the resumes from sharded checkpoints by tests/test_rl_fsdp.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cppo.models import TinyVLMConfig, build_tiny_model
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}
# 16 layers of 3.15 M parameters (q, k, v, o and a 1536-wide MLP at width 512): 51 M in all
WIDE = TinyVLMConfig(hidden_size=512, num_layers=16, num_heads=8, num_kv_heads=4, intermediate_size=1536)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """(rank 0's record, rank 1's record, the model's float32 size in MiB) of the worker's run on a
    base model, a full checkpoint of the same shape (another seed) and a model whose weights do not
    fit its config."""
    tmp = tmp_path_factory.mktemp("fsdp_load")
    for seed, name in ((0, "base"), (1, "checkpoint")):
        model, processor = build_tiny_model(WIDE, seed=seed)
        model.save_pretrained(tmp / name)
        processor.save_pretrained(tmp / name)
    mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20  # the tied head counted once
    del model
    model, processor = build_tiny_model(seed=0)  # a small one whose config asks for a wider MLP
    model.save_pretrained(tmp / "bad")
    processor.save_pretrained(tmp / "bad")
    config = json.loads((tmp / "bad" / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 64
    (tmp / "bad" / "config.json").write_text(json.dumps(config))
    env = {**os.environ, **FSDP_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29647"]
    cmd += [str(REPO / "tests/workers/fsdp_load.py"), str(tmp / "out")]
    cmd += [str(tmp / "base"), str(tmp / "checkpoint"), str(tmp / "bad")]
    done = subprocess.run(cmd, env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-6000:]
    records = [torch.load(tmp / f"out.rank{r}.pt", weights_only=False) for r in (0, 1)]
    return records[0], records[1], mib


def _assert_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)


@pytest.mark.slow
def test_the_sharded_policy_and_reference_hold_the_checkpoint_and_compute_as_it(loaded):
    for record in loaded[:2]:
        assert record["sharded"]
        _assert_equal(record["policy"], record["plain"])  # gathered from the shards, float32
        _assert_equal(record["reference"], record["plain"])  # float32 compute on the CPU
        _assert_equal(record["buffers"], record["plain_buffers"])  # rotary inv_freq tables: not in any file
        assert record["tied"]  # the output head is still the embedding matrix
        generation, plain_generation = record["generation"]
        assert generation == plain_generation
        assert record["logits"].abs().sum() > 0
        torch.testing.assert_close(record["logits"], record["plain_logits"], atol=0, rtol=0)


@pytest.mark.slow
def test_a_full_checkpoint_resumes_into_the_policy_and_the_base_into_the_reference(loaded):
    for record in loaded[:2]:
        _assert_equal(record["resumed_policy"], record["checkpoint"])
        _assert_equal(record["resumed_reference"], record["plain"])  # the base's weights
        assert not torch.equal(record["checkpoint"]["lm_head.weight"], record["plain"]["lm_head.weight"])


@pytest.mark.slow
def test_only_rank_0_holds_a_full_copy_in_host_memory(loaded):
    """Peak resident set during the build above the one before it, as a share of one float32 copy.
    Measured (195 MiB): rank 1 holds its half of the policy and a few MiB (0.57x); rank 0 the copy it
    read and its half (1.55x); a reference adds half a copy on each; the way before (every rank
    loads the whole model, then shards it) costs rank 1 a full copy and more (1.2x)."""
    rank0, rank1, mib = loaded
    keys = ("policy_mb", "policy_and_reference_mb", "before_mb")
    share = {k: (round(rank0[k] / mib, 3), round(rank1[k] / mib, 3)) for k in keys}
    print(f"model {mib:.0f} MiB; peak increase as a share of it (rank 0, rank 1): {share}")
    assert share["policy_mb"][1] < 0.65  # its shard (0.5) and no full copy
    assert 0.95 < share["policy_mb"][0] < 1.75  # the copy it read, its shard, not a second copy
    assert share["policy_and_reference_mb"][1] < 1.2  # two halves: the policy's and the reference's
    assert share["before_mb"][1] > 1.0  # the measure sees a full copy where there is one


@pytest.mark.slow
def test_weights_rank_0_cannot_load_stop_every_rank_with_one_line(loaded):
    """Only rank 0 reads the weights; the other rank, waiting for them, stops too instead of hanging."""
    rank0, rank1, _ = loaded
    assert rank0["bad"][0] == "ConfigError" and "do not fit its config.json" in rank0["bad"][1]
    assert rank1["bad"][0] == "RuntimeError"
    assert rank1["bad"][1].startswith("rank 0 could not load the model's weights: ModelError:")
