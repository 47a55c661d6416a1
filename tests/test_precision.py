"""bf16 compute over float32 master weights (docs/training.md, "Precision"), all on the CPU.

bf16 parameters updated in place lose every update below ~|w|/256; the trainer keeps float32
parameters, gradients and AdamW state and computes the forwards in bf16 under autocast."""

import json

import pytest
import torch
from safetensors import safe_open

from cli.train import main as train_main
from cppo.models import demo_model_path, load_model_and_processor
from cppo.perturb import get_preset
from cppo.precision import autocast, resolve_dtype
from cppo.response_stats import fused_head_stats
from cppo.rl.config import TrainConfig
from cppo.rl.data import open_dataset
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts, prepare_prompts
from cppo.rl.update import Timer, micro_batch_loss
from tests.helpers import demo_model_and_processor, shapes_dataset

LENGTH_REWARD = "tests/workers/length_reward.py:by_length"  # varies with the response: A != 0


def test_auto_is_bf16_compute_on_cuda_and_fp32_on_the_cpu():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="valid: auto"):
        resolve_dtype("half-ish", torch.device("cpu"))


def _reference_head(h, weight, targets, temperature):
    """Plain autograd: log_softmax(h W^T / t) at the targets, the matmul under the caller's autocast."""
    z = torch.nn.functional.linear(h, weight).float() / temperature  # (P, V)
    logp = z.log_softmax(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16], ids=["h-fp32", "h-bf16"])
def test_fused_head_under_bf16_autocast_equals_autograd(h_dtype):
    """The hand-written backward computes in the dtype autocast gave the forward, even though the
    backward itself runs outside the autocast region (as on CUDA), and returns a float32 gradient
    for the float32 master weight. A bf16 hidden state with a float32 head failed before."""
    g = torch.Generator().manual_seed(0)
    P, D, V = 7, 16, 50
    h0 = torch.randn(P, D, generator=g).to(h_dtype)
    w0 = torch.randn(V, D, generator=g) * 0.3
    targets = torch.randint(V, (P,), generator=g)
    scale = torch.linspace(0.5, 1.5, P)
    out = {}
    for name in ("fused", "reference"):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        with autocast("cpu", torch.bfloat16):
            if name == "fused":
                mask = torch.ones(1, P, dtype=torch.bool)
                ent, lp = fused_head_stats(h.unsqueeze(0), w, targets.unsqueeze(0), mask, 0.7, chunk_size=3)
                ent, lp = ent[0], lp[0]
            else:
                lp, ent = _reference_head(h, w, targets, 0.7)
        (lp * scale).sum().backward()  # outside autocast
        out[name] = (ent.detach(), lp.detach(), h.grad, w.grad)
    (ef, lf, hf, wf), (er, lr, hr, wr) = out["fused"], out["reference"]
    assert wf.dtype == torch.float32 and hf.dtype == h_dtype
    torch.testing.assert_close(lf, lr, atol=1e-5, rtol=1e-5)  # same bf16 logits, same float32 maths
    torch.testing.assert_close(ef, er, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf.float(), hr.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(wf, wr, atol=1e-2, rtol=1e-2)


@pytest.fixture(scope="module")
def demo_rollouts(tmp_path_factory):
    model, processor = demo_model_and_processor()
    ds = open_dataset(shapes_dataset(tmp_path_factory.mktemp("data"), n=4)["train"])
    cfg = TrainConfig(
        algo="cppo", group_size=4, prompts_per_step=2, max_new_tokens=24, micro_batch_size=8, beta=0.0
    )
    ro = collect_rollouts(
        model,
        processor,
        prepare_prompts(processor, [ds[0], ds[1]], [5, 6], cfg.algo, get_preset("paper")),
        cfg,
        RewardScorer(cfg.rewards, cfg.reward_weights),
        generator_seed=0,
    )
    ro.advantages = torch.tensor([1.0, -0.5, 0.7, -1.0, 0.2, 0.0, 0.9, -0.3])  # open the gate on 4 rows
    return model, ro, cfg


def test_bf16_compute_loss_equals_fp32_and_gradients_stay_fp32(demo_rollouts):
    """The first step's loss under bf16 compute equals the float32 path's within bf16 rounding, on
    the same rollouts; the parameters and their gradients stay float32."""
    model, ro, cfg = demo_rollouts
    cfg.cpl_lambda = 1.0  # make the CPL term weigh in the comparison
    # every response token selected, in both precisions: with the default selector a token whose
    # entropy barely moves between the views (dH near 0) is in or out depending on bf16 rounding, which
    # differs between CPUs (26 against 24 tokens on one), and that is not what this compares
    saved = cfg.selector, cfg.top_percent
    cfg.selector, cfg.top_percent = "entropy", 1.0
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg.dtype = dtype
        model.zero_grad(set_to_none=True)
        loss, metrics = micro_batch_loss(model, ro, list(range(ro.num_rows)), cfg, Timer())
        loss.backward()
        assert metrics["cpl/rows"] > 0
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
        losses[dtype] = float(loss.detach())
    cfg.dtype, cfg.cpl_lambda, (cfg.selector, cfg.top_percent) = "auto", 0.01, saved
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2, abs=2e-3)


def _moved_fraction(ckpt, start: dict) -> tuple[float, set]:
    """Share of weight elements that differ from `start`, and the dtypes the checkpoint holds."""
    moved = total = 0
    dtypes = set()
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    dtypes = {t.dtype for t in saved.values()}
    model, _ = load_model_and_processor(ckpt)
    for name, value in model.state_dict().items():
        moved += int((value != start[name]).sum())
        total += value.numel()
    return moved / total, dtypes


@pytest.mark.slow
def test_two_updates_at_lr_1e6_under_bf16_move_the_weights(tmp_path):
    """cppo-train --dtype bfloat16 at the paper's lr 1e-6: 2 updates move as many of the demo model's
    weights as a float32 run does (within 1 %), and the checkpoint keeps the float32 master weights;
    --pure-bf16 (bf16 parameters, no master copy) loses most of the same updates, which is what its
    help warns of. The float32 run is the reference because a few % of the weights get gradients so
    small that AdamW's step is below float32's resolution too (96.5 % move on the bundled model)."""
    start = load_model_and_processor(demo_model_path())[0].state_dict()
    common = [
        "--algo", "grpo", "--lr", "1e-6", "--warmup-steps", "0", "--max-steps", "2",
        "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "16", "--beta", "0",
        "--rewards", LENGTH_REWARD, "--reward-weights", "1.0", "--no-tensorboard", "--seed", "0",
        "--no-freeze-vision",  # every weight, the vision tower included
        "--eval-at-start", "false",  # the demo's evaluation measures nothing here
    ]  # fmt: skip
    fractions = {}
    runs = {
        "float32": ["--dtype", "float32"],
        "master": ["--dtype", "bfloat16"],
        "pure": ["--dtype", "bfloat16", "--pure-bf16"],
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert train_main([*common, "--output-dir", str(out), *extra]) == 0
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        lines = [m for m in lines if m["step"] >= 1]  # step 0 would be an evaluation before training
        assert [m["update/skipped_nonfinite"] for m in lines] == [0.0, 0.0]
        (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
        fractions[name], dtypes = _moved_fraction(ckpt, start)
        assert dtypes == ({torch.bfloat16} if name == "pure" else {torch.float32}), dtypes
    assert fractions["float32"] >= 0.9, fractions
    assert fractions["master"] >= 0.99 * fractions["float32"], fractions
    assert fractions["pure"] < 0.5, fractions


@pytest.mark.parametrize(
    "name, expected",
    [
        ("tpu9", "--device 'tpu9' is not a device torch knows"),
        ("meta", "cppo-x runs on cpu or cuda"),
        *([("cuda", "this torch sees no CUDA device")] if not torch.cuda.is_available() else []),
    ],
)
def test_check_device_is_one_line_naming_the_flag(name, expected):
    from cppo.precision import check_device

    with pytest.raises(ValueError) as e:
        check_device(name, "cppo-x")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert check_device("cpu", "cppo-x") == torch.device("cpu")
