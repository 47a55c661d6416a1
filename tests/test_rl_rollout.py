"""Rollouts sample from exactly the policy that is trained, and report what they cut off."""

import pytest
import torch

from cppo.models import append_responses, generate_responses, load_model_and_processor
from cppo.perturb import get_preset
from cppo.response_stats import response_stats
from cppo.rl.config import TrainConfig
from cppo.rl.data import open_dataset
from cppo.rl.reporting import peak_memory_mb, reset_peak_memory, step_metrics
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts, prepare_prompts, truncated_rows
from cppo.rl.update import Timer
from tests.helpers import shapes_batch, shapes_dataset, tiny_model_and_processor


def _model_with_shipped_sampling(tmp_path):
    """A saved tiny model whose generation_config.json samples as Qwen2.5-VL-Instruct's does
    (repetition_penalty 1.05, top_k 1: every sample would be the greedy one, temperature 0.1)."""
    model, processor = tiny_model_and_processor(seed=5)
    gc = model.generation_config
    gc.do_sample, gc.repetition_penalty, gc.top_k, gc.top_p, gc.temperature = True, 1.05, 1, 0.001, 0.1
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, processor = load_model_and_processor(tmp_path)
    assert loaded.generation_config.repetition_penalty == 1.05 and loaded.generation_config.top_k == 1
    return loaded, processor


def test_rollout_logprobs_equal_teacher_forced_despite_the_checkpoints_generation_config(tmp_path):
    model, processor = _model_with_shipped_sampling(tmp_path)
    _, batch = shapes_batch(processor, n=4, seed=2)
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=1.0, top_k=0, repetition_penalty=1.0)
    ids, mask, sampled = generate_responses(
        model, processor, batch, generator_seed=0, return_logprobs=True, **kw
    )
    _, forced = response_stats(model, append_responses(batch, ids, mask), ids, mask, temperature=0.9)
    assert bool(mask.any())
    torch.testing.assert_close(sampled, forced.detach(), atol=2e-6, rtol=0)
    # The check has teeth: the checkpoint's penalty, asked for, samples from another distribution.
    ids2, mask2, penalised = generate_responses(
        model, processor, batch, generator_seed=0, return_logprobs=True, **{**kw, "repetition_penalty": 1.05}
    )
    _, forced2 = response_stats(model, append_responses(batch, ids2, mask2), ids2, mask2, temperature=0.9)
    assert float((penalised - forced2.detach()).abs().max()) > 1e-3
    assert model.generation_config.repetition_penalty == 1.05  # the model's own config is restored


def test_collect_rollouts_samples_with_the_configured_sampler_only(tmp_path):
    """With the checkpoint's top_k 1 applied, a group's 6 samples would all be the greedy one."""
    model, processor = _model_with_shipped_sampling(tmp_path / "model")
    ds = open_dataset(shapes_dataset(tmp_path / "data", n=2)["train"])
    cfg = TrainConfig(
        algo="grpo", group_size=6, prompts_per_step=1, max_new_tokens=8, micro_batch_size=6, beta=0.0
    )
    ro = collect_rollouts(
        model, processor, prepare_prompts(processor, [ds[0]], [1], cfg.algo, get_preset("paper")), cfg,
        RewardScorer(cfg.rewards, cfg.reward_weights), generator_seed=0,
    )  # fmt: skip
    assert len({tuple(r.tolist()) for r in ro.response_ids}) > 1


def test_truncated_rows_are_those_without_an_end_token():
    # end ids 9; pad 0. Row 0 ended early, row 1 was cut, row 2 ended on the last column.
    ids = torch.tensor([[5, 9, 0, 0], [5, 6, 7, 8], [5, 6, 7, 9]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert truncated_rows(ids, mask, [9]).tolist() == [False, True, False]


class _FakeRollouts:
    """What step_metrics reads of a Rollouts."""

    def __init__(self, ids, mask, truncated):
        from cppo.rl.rewards import RewardResult

        self.response_mask, self.truncated = mask, truncated
        self.inputs = {"attention_mask": torch.ones(len(ids), 3), "prompt_length": 3}
        self.advantages = torch.zeros(len(ids))
        self.reward_result = RewardResult(total=[0.0] * len(ids), components={})


def test_response_clipped_counts_responses_cut_at_max_new_tokens():
    """Two of three responses fill the batch's longest length, only one of them was cut: 1/3, where
    comparing with the batch's longest response said 2/3."""
    ids = torch.tensor([[5, 9, 0, 0], [5, 6, 7, 8], [5, 6, 7, 9]])
    mask = ids != 0
    ro = _FakeRollouts(ids, mask, truncated_rows(ids, mask, [9]))
    metrics = step_metrics(ro, Timer(), 1.0, torch.device("cpu"), 1)
    assert metrics["response/clipped"] == pytest.approx(1 / 3)


def test_peak_memory_is_reset_each_step():
    """A 256 MiB buffer freed before the reset does not count in the next step's peak. Other threads
    of the test process (a prefetcher or reward worker left by an earlier test) can move the resident
    set by a few MiB, so the 256 MiB gap is asked for in one of three tries, not to the byte."""
    cpu = torch.device("cpu")
    gaps, returned = [], []
    for _ in range(3):
        reset_peak_memory(cpu)
        big = torch.ones(64 * 2**20)  # 256 MiB, touched
        first, held = peak_memory_mb(cpu), _rss_mb()
        del big
        returned.append(held - _rss_mb())  # what the allocator gave back to the kernel
        reset_peak_memory(cpu)
        second = peak_memory_mb(cpu)
        assert first is not None and second is not None
        gaps.append(first - second)
        if gaps[-1] > 200:
            break
    if max(returned) < 200:  # the freed buffer stayed resident, so no peak can drop below it
        pytest.skip(f"the allocator kept the freed 256 MiB resident here ({returned} MiB returned)")
    assert max(gaps) > 200, gaps  # without the reset the second peak would include the buffer: gap ~0


def _rss_mb() -> float:
    line = next(x for x in open("/proc/self/status").read().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024
