"""Every pass that scores a response under an image sees the image: its scores under the image differ
from its scores under a blank image of the same size, on the bundled demo model.

A transformers release that drops an argument without a word (5.17 took no `mm_encoder_outputs`:
every teacher-forced pass then scored with no image, log-probs equal to the image-less ones to the
last bit) fails here. The passes: the rollout's generation, the old and reference log-probs, the
anchor, I+ and I- passes of the update, the detector's two passes and the evaluation. Each runs in
float32 and under bf16 autocast on the CPU; with CUDA the same checks run on the GPU in bf16
(marked `gpu`, part of bench/gpu_check.sh). The demo model's answers depend on the image (80.8 %
with it, 37 % on blank images: docs/models.md), so a gap of more than 1 nat on some token is what a
pass that sees the image shows; rounding alone moves a log-prob by hundredths.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from PIL import Image

from cppo.detect.detection import Example
from cppo.detect.detector import PerceptionDetector
from cppo.models.evaluate import evaluate_shapes
from cppo.models.inputs import generate_responses
from cppo.perturb import get_preset
from cppo.precision import autocast
from cppo.prompt import INSTRUCTION
from cppo.rl.config import TrainConfig
from cppo.rl.data import open_dataset
from cppo.rl.reference import build_reference
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts, prepare_prompts
from cppo.rl.update import _entropy_and_logp, rollout_logprobs
from tests.helpers import demo_model_and_processor, shapes_dataset, shapes_items

SEEN = 1.0  # nats: the least largest gap a pass that sees the image shows (module docstring)
N_PROMPTS = 3

CASES = [
    pytest.param(("cpu", "float32"), id="cpu-fp32"),
    pytest.param(("cpu", "bfloat16"), id="cpu-bf16"),
    pytest.param(("cuda", "bfloat16"), id="cuda-bf16", marks=pytest.mark.gpu),
]


def _blank(sample):
    """`sample` with each image replaced by a mid-grey one of the same size (so the same tokens)."""
    grey = [Image.new("RGB", im.size, (128, 128, 128)) for im in sample.images]
    return dataclasses.replace(sample, images=grey)


def _gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """The largest |a - b| over the response tokens."""
    return float(((a.float() - b.float()).abs() * mask).max())


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    ds = open_dataset(shapes_dataset(tmp_path_factory.mktemp("seen"), n=N_PROMPTS, seed=3)["train"])
    return [ds[i] for i in range(N_PROMPTS)]


@pytest.fixture(scope="module", params=CASES)
def case(request, samples):
    """(device, dtype, model on the device, processor, cfg, rollouts under the images, the same
    rollouts with every image and view blank), once per case."""
    device, dtype = request.param
    return (device, dtype, *_setup(device, dtype, samples))


def _setup(device: str, dtype: str, samples):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, processor = demo_model_and_processor()
    model = model.to(device)
    cfg = TrainConfig(
        algo="cppo",
        group_size=2,
        prompts_per_step=N_PROMPTS,
        max_new_tokens=24,
        dtype=dtype,
        beta=0.01,
        micro_batch_size=6,
    )
    preset = get_preset(cfg.preset)
    seeds = list(range(N_PROMPTS))
    ro = collect_rollouts(
        model,
        processor,
        prepare_prompts(processor, samples, seeds, cfg.algo, preset, INSTRUCTION),
        cfg,
        RewardScorer(cfg.rewards, cfg.reward_weights),
        generator_seed=0,
    )
    blank = prepare_prompts(processor, [_blank(s) for s in samples], seeds, cfg.algo, preset, INSTRUCTION)
    ro_blank = copy.copy(ro)
    ro_blank.pixel_values = blank.batch["pixel_values"]
    ro_blank.views = {v: blank.batch["pixel_values"] for v in ro.views}
    assert ro.views.keys() == {"positive", "negative"}
    return model, processor, cfg, ro, ro_blank


def test_every_teacher_forced_pass_of_the_trainer_sees_the_image(case, samples):
    _, dtype, model, _, cfg, ro, ro_blank = case
    mask = ro.response_mask.float()
    assert mask.sum(1).min() > 0
    gaps = {}
    # old log-probs (ppo_epochs > 1) and the reference's, both through rollout_logprobs
    gaps["old"] = _gap(rollout_logprobs(model, ro, cfg), rollout_logprobs(model, ro_blank, cfg), mask)
    ref = build_reference(model, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    gaps["reference"] = _gap(rollout_logprobs(ref, ro, cfg), rollout_logprobs(ref, ro_blank, cfg), mask)
    rows = list(range(ro.num_rows))
    for name, view in (("anchor", None), ("I+", "positive"), ("I-", "negative")):
        with torch.enable_grad():  # as the update runs them
            seen = _entropy_and_logp(model, ro, rows, cfg, view)[1].detach().cpu()
            blind = _entropy_and_logp(model, ro_blank, rows, cfg, view)[1].detach().cpu()
        gaps[name] = _gap(seen, blind, mask)
    assert all(g > SEEN for g in gaps.values()), gaps


def test_rollout_generation_sees_the_image(case, samples):
    device, dtype, model, processor, cfg, _, _ = case
    preset = get_preset(cfg.preset)
    seen, blind = (
        prepare_prompts(processor, ss, [0] * N_PROMPTS, "grpo", preset, INSTRUCTION).batch
        for ss in (samples, [_blank(s) for s in samples])
    )
    with autocast(torch.device(device), getattr(torch, dtype)):
        ids_a, mask_a, lp_a = generate_responses(
            model, processor, seen, max_new_tokens=24, do_sample=False, return_logprobs=True
        )
        ids_b, _, lp_b = generate_responses(
            model, processor, blind, max_new_tokens=24, do_sample=False, return_logprobs=True
        )
    for i in range(N_PROMPTS):  # each response: other tokens, or the same tokens scored apart
        t = int(mask_a[i].sum())
        other_tokens = not torch.equal(ids_a[i, :t], ids_b[i, :t])
        assert other_tokens or _gap(lp_a[i, :t], lp_b[i, :t], mask_a[i, :t].float()) > SEEN, i


def test_the_detectors_passes_see_the_image(case, samples):
    device, dtype, model, processor, _, _, _ = case
    model = copy.deepcopy(model).to(getattr(torch, dtype))  # the detector runs in the model's dtype
    detector = PerceptionDetector(model, processor, draws=1, seed=0)
    response = "There are 2 red shapes. The answer is \\boxed{2}."
    found = {}
    for name, ss in (("seen", samples), ("blind", [_blank(s) for s in samples])):
        found[name] = detector.detect([Example(s.images, s.question, response) for s in ss])
    for a, b in zip(found["seen"], found["blind"]):
        mask = a.response_mask.float()
        assert _gap(a.entropy, b.entropy, mask) > SEEN / 4  # H(I): entropies move less than log-probs
        assert _gap(a.perturbed_entropy, b.perturbed_entropy, mask) > SEEN / 4  # H(I-)


def test_evaluation_sees_the_image(case, samples):
    device, dtype, model, processor, _, _, _ = case
    items = shapes_items(24, seed=5)
    with autocast(torch.device(device), getattr(torch, dtype)):
        seen = evaluate_shapes(model, processor, items, max_new_tokens=40)
        blind = evaluate_shapes(model, processor, items, max_new_tokens=40, blank_images=True)
    differ = sum(a != b for a, b in zip(seen["responses"], blind["responses"]))
    assert differ >= len(items) // 3, (differ, seen["accuracy"], blind["accuracy"])
    assert seen["accuracy"] > blind["accuracy"]
