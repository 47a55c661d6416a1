"""cppo.rl.resume: which config fields a resume may change (TrainConfig's resume_safe metadata),
how changes are listed, and the refusal of a checkpoint saved with another number of GPUs.

The end-to-end resume behaviour (refusals through cppo-train, forced resumes, truncated and
tampered checkpoints) is in tests/test_reliability.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cppo.rl.config import ConfigError, TrainConfig, resume_safe_fields
from cppo.rl.resume import check_gpu_count, config_changes

SAFE = set(
    """max_steps save_every keep_last keep_best eval_every eval_samples eval_data log_rollouts resume
    force_resume tensorboard output_dir device micro_batch_size logits_chunk_size gradient_checkpointing
    data_strict max_bad_steps epochs eval_data_columns ref_offload export_pretrained""".split()
)
SAFE |= {"generation_batch_size", "rollout_engine", "sort_by_length", "prefetch"}  # how rollouts are made
SAFE |= {"reward_timeout", "reward_hang_steps", "drop_hung_rewards"}  # a reward call's time limit, a hung one
SAFE |= {"dist_timeout"}  # how long a collective may wait
SAFE |= {"overwrite"}  # what a fresh start does with an earlier run's files (cppo.rl.rundir)
SAFE |= {"report_to", "project", "run_name", "rollout_table_every", "eval_at_start"}  # following a run
SAFE |= {"eval_views"}  # what the held-out evaluation also measures
SAFE |= {"eval_limit"}  # how many held-out items an evaluation answers


def test_resume_safe_fields_are_the_marked_config_fields():
    assert resume_safe_fields() == SAFE
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert SAFE <= names and "group_size" not in SAFE and "seed" not in SAFE


def test_config_changes_lists_unsafe_differences_only():
    saved = TrainConfig().to_dict()
    current = TrainConfig(max_steps=99, keep_last=5, group_size=3, seed=1).to_dict()
    assert config_changes(saved, current) == ["seed 0 -> 1", "group_size 8 -> 3"]
    saved["betas"] = (0.9, 0.999)  # a tuple and its list are equal
    saved["from_another_version"] = 1  # a field only one side has is not compared
    assert config_changes(saved, TrainConfig().to_dict()) == []
    assert config_changes({"seed": 0}, {"seed": 1}, safe=frozenset({"seed"})) == []


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_checkpoint_saved_with_another_gpu_count_is_refused(two_gpus, tmp_path):
    with pytest.raises(ConfigError, match="saw 4 GPUs, this one sees 2.*CUDA_VISIBLE_DEVICES"):
        check_gpu_count(tmp_path, {"gpus": 4})
    with pytest.raises(ConfigError, match="saw 4 GPUs"):  # a checkpoint that stored CUDA RNG states
        check_gpu_count(tmp_path, {"rng": {"cuda": [torch.zeros(1)] * 4}})
    check_gpu_count(tmp_path, {"gpus": 2})
    check_gpu_count(tmp_path, {"gpus": 0})  # saved without CUDA
    check_gpu_count(tmp_path, {"rng": {"python": {}}})


def test_gpu_count_is_not_checked_without_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_gpu_count(tmp_path, {"gpus": 4})
