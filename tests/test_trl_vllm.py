"""The vLLM route of docs/real-models.md: `CPPOTrainer` with `use_vllm=True, vllm_mode="colocate"` runs
TRL's own vLLM code path (trl.generation.vllm_generation.VLLMGeneration: building the engine, the
weight sync, the sampling parameters, the prompts with their images, the log-probs for the
importance-sampling correction) with only vLLM itself replaced by tests/fake_vllm.py. What this
cannot check, and needs a GPU with vLLM installed: vLLM's own model, memory and speed."""

import warnings

import pytest
import torch

pytest.importorskip("trl")
import trl.generation.vllm_generation as vllm_generation  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from cppo.integrations.trl import CPPOConfig, CPPOTrainer  # noqa: E402
from cppo.models import ImageOnlyQwen2_5_VLProcessor, demo_model_path  # noqa: E402
from cppo.prompt import build_messages  # noqa: E402
from cppo.toy.shapes import split_items  # noqa: E402
from tests.fake_vllm import FakeLLM, FakeSamplingParams  # noqa: E402

RECIPE = dict(
    use_vllm=True,
    vllm_mode="colocate",
    vllm_gpu_memory_utilization=0.3,
    vllm_tensor_parallel_size=1,
    vllm_enable_sleep_mode=True,
)  # fmt: skip  (docs/real-models.md, docs/trl.md)
TINY = dict(use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, max_steps=2,
            per_device_train_batch_size=8, num_generations=2, max_completion_length=16,
            gradient_checkpointing=False, learning_rate=1e-3, temperature=1.5, seed=0,
            cpl_lambda=0.5)  # fmt: skip


def reward(completions, answer, **kwargs):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(a in t) + 0.1 * min(len(t), 40) / 40 for t, a in zip(texts, answer)]


@pytest.fixture
def fake_vllm(monkeypatch):
    """vLLM "installed": TRL's module sees it available and builds FakeLLM where it would build vllm.LLM.
    TRL's colocate setup writes RANK, WORLD_SIZE, MASTER_ADDR... into the environment: restored after."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # the value before, restored at the end
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(vllm_generation, "SamplingParams", FakeSamplingParams, raising=False)
    FakeLLM.instances = []
    return FakeLLM.instances


def test_the_colocate_recipe_trains_through_trls_vllm_path(fake_vllm, tmp_path):
    items = split_items("train", 4)
    dataset = Dataset.from_list(
        [{"prompt": build_messages(it.question), "image": it.image, "answer": it.answer} for it in items]
    )
    processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(demo_model_path(), padding_side="left")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo_model_path(), dtype=torch.float32)
    args = CPPOConfig(output_dir=str(tmp_path), **TINY, **RECIPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = CPPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                              processing_class=processor)  # fmt: skip
        [llm] = fake_vllm  # TRL built one engine, with the recipe's settings
        assert llm.kwargs["gpu_memory_utilization"] == 0.3 and llm.kwargs["enable_sleep_mode"] is True
        assert llm.kwargs["logprobs_mode"] == "processed_logprobs"  # what the IS correction needs
        assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
        trainer.train()
    # every step: weights pushed by name into the engine, then one generate call of the step's 8 rows
    assert llm.generate_calls == [8, 8]
    names = [n for n, _ in llm.model.named_parameters()]
    assert llm.loaded == names + names
    assert "wake_up weights" in llm.events and "sleep 2" in llm.events
    start = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo_model_path(), dtype=torch.float32)
    synced = dict(llm.model.named_parameters())  # step 2's sync: the weights after step 1's update
    assert any(not torch.equal(p, synced[n]) for n, p in start.named_parameters())
    logged = trainer.state.log_history[0]
    assert {"cpl/loss", "cpl/mask_frac"} <= set(logged)
    # TRL's importance-sampling correction ran on the engine's log-probs: the sampler and the trainer
    # had the same weights at step 1 and the log-probs are of the processed (temperature) distribution
    assert logged["sampling/sampling_logp_difference/max"] < 1e-4
    assert logged["sampling/importance_sampling_ratio/min"] > 0.999
