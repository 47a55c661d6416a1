"""The memory model (cppo.rl.memory): parameter counts equal the real model's, the parts follow their
definitions, and the estimate agrees with a measured CPU update within a factor of two."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from cppo.models import TinyVLMConfig, build_processor
from cppo.models.build import qwen_config
from cppo.rl.memory import SHAPES, ModelShape, RunShape, estimate

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _meta_count(config: TinyVLMConfig) -> tuple[int, ModelShape]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    qcfg = qwen_config(config, build_processor(config).tokenizer)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qcfg)
    return sum(p.numel() for p in model.parameters()), ModelShape.from_config(qcfg)


@pytest.mark.parametrize(
    "sizes",
    [
        {},
        dict(hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=1, intermediate_size=640,
             tie_word_embeddings=False),
    ],
    ids=["tiny", "untied"],
)  # fmt: skip
def test_parameter_count_equals_the_model_built_from_the_config(sizes):
    count, shape = _meta_count(TinyVLMConfig(**sizes))
    assert shape.params() == count


def test_the_3b_shape_is_qwen25_vl_3b():
    # Qwen2.5-VL-3B-Instruct: 3,754,622,976 parameters (tied head), built here on the meta device.
    count, shape = _meta_count(
        TinyVLMConfig(hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008,
                      vocab_size=151936, vision_hidden_size=1280, vision_depth=32, vision_heads=16,
                      vision_intermediate_size=3420)
    )  # fmt: skip
    assert count == SHAPES["3b"].params() == shape.params() == 3_754_622_976


def test_parts_follow_their_definitions():
    m = SHAPES["3b"]
    P = m.params()
    one = estimate(m, RunShape(gpus=1, generate_rows=10, prompt_tokens=100, response_tokens=100))
    eight = estimate(m, RunShape(gpus=8, fsdp=True, generate_rows=10, prompt_tokens=100, response_tokens=100))
    assert one["master_weights"] == 4 * P and one["gradients"] == 4 * P and one["optimizer"] == 8 * P
    assert eight["master_weights"] == 4 * P / 8 and eight["optimizer"] == 8 * P / 8
    assert one["reference"] == eight["reference"] == 2 * P  # today's reference: a full copy per GPU
    # KV cache: 2 (K, V) x 36 layers x 2 heads x 128 dims x 2 bytes = 36,864 bytes per token
    assert one["kv_cache"] == 36_864 * 10 * 200
    pure = estimate(m, RunShape(pure_bf16=True, generate_rows=1))
    assert pure["master_weights"] == 2 * P and pure["optimizer"] == 4 * P
    cpu_ref = estimate(m, RunShape(reference="cpu", generate_rows=1))
    assert cpu_ref["reference"] == 0 and cpu_ref["peak"] < estimate(m, RunShape(generate_rows=1))["peak"]


@pytest.mark.slow
def test_the_estimate_agrees_with_a_measured_cpu_update():
    spec = importlib.util.spec_from_file_location("memory_model", BENCH / "memory_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(mod)
    measured, estimated = mod.measure_cpu_update()
    assert 0.5 < measured / estimated < 2.0, (measured, estimated)
    assert "| 3B | 8 GPUs" in mod.table()


def test_the_dry_run_places_the_reference_where_the_trainer_does():
    from cppo.rl.config import TrainConfig
    from cppo.rl.plan import reference_placement

    assert reference_placement(TrainConfig(beta=0.0), fsdp=True) == "none"
    assert reference_placement(TrainConfig(), fsdp=False) == "full"
    assert reference_placement(TrainConfig(), fsdp=True) == "sharded"
    assert reference_placement(TrainConfig(ref_offload=True), fsdp=True) == "cpu"
