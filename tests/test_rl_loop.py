"""End-to-end runs of the training loop on a tiny model: something must change, and be logged."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.train import main as train_main
from cppo.models import load_model_and_processor
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]


def _flags(tiny_dir, data, out, *extra):
    return [
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--micro-batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--lr",
        "1e-3",
        "--no-tensorboard",
        "--seed",
        "0",
        *extra,
    ]


EXPECTED_KEYS = {
    "step",
    "reward/total",
    "reward/accuracy",
    "reward/format",
    "response/length",
    "grpo/pg_loss",
    "grpo/clip_frac",
    "grpo/kl",
    "entropy/mean",
    "cpl/loss",
    "cpl/mask_frac",
    "time/rollout",
    "time/reward",
    "time/old_ref_logprobs",
    "time/update",
    "time/perception",
    "time/step",
    "throughput/tokens_per_s",
    "memory/peak_mb",
    "grad_norm",
    "lr",
}


def test_two_step_cppo_run_changes_weights_and_logs_every_key(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    # cpl_gate none: a random tiny model earns no reward, so the A > 0 gate would keep CPL at 0.
    assert (
        train_main(_flags(tiny_dir, data, out, "--algo", "cppo", "--cpl-gate", "none", "--beta", "0.01")) == 0
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    missing = EXPECTED_KEYS - set(lines[0])
    assert not missing, f"metrics.jsonl lacks {sorted(missing)}"
    assert any(m["cpl/mask_frac"] > 0 for m in lines) and any(m["time/perception"] > 0 for m in lines)
    for name in ("config.yaml", "rollouts.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts and ckpts[-1].name == "step-000002"
    trained, _ = load_model_and_processor(ckpts[-1])
    start, _ = load_model_and_processor(tiny_dir)
    changed = [
        n
        for (n, a), (_, b) in zip(trained.named_parameters(), start.named_parameters())
        if not torch.equal(a, b)
    ]
    assert changed, "no parameter changed in two steps"
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert {"question", "answer", "response", "reward", "advantage"} <= set(rollouts[0])


def test_bad_config_and_bad_data_exit_2_with_one_line(tiny_dir, data, tmp_path, capsys):
    assert train_main(_flags(tiny_dir, data, tmp_path / "a", "--group-size", "0")) == 2
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "x.png", "question": "q", "answer": "1"}\n{not json\n')
    assert train_main(_flags(tiny_dir, broken, tmp_path / "b")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cppo-train: error:") and "broken.jsonl:2" in err[-1]


def _run(cmd, env):
    done = subprocess.run(cmd, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-6000:]


def _half_text_only(data: Path, out: Path) -> Path:
    """A copy of `data` in which every other sample has no image (text-only rows, docs/method.md §5.9)."""
    lines = data.read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    for i, row in enumerate(rows):
        if i % 2:
            del row["image"]
    shutil.copytree(data.parent / "images", out.parent / "images")  # images stay in the data folder
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# ddp / fsdp2: the gate off, every view pass on every row. The other cases use the defaults (gate
# A > 0, relative selector) with a reward that varies with the response and half the prompts
# text-only, so that ranks need different view passes (and one may have no image at all) in a
# micro-batch: under FSDP they must still issue the same sharded forwards (cppo.rl.update).
MULTI_PROCESS_CASES = {
    "ddp": dict(fsdp=False, extra=["--algo", "cppo", "--cpl-gate", "none"]),
    "fsdp2": dict(fsdp=True, extra=["--algo", "cppo", "--cpl-gate", "none"]),
    "fsdp2-cppo-defaults": dict(fsdp=True, mixed=True, extra=["--algo", "cppo"]),
    "fsdp2-papo": dict(fsdp=True, mixed=True, extra=["--algo", "papo"]),
    "fsdp2-bf16": dict(
        fsdp=True,
        mixed=True,
        bf16=True,
        extra=[
            *("--algo", "cppo", "--dtype", "bfloat16", "--lr", "1e-6", "--warmup-steps", "0"),
            "--no-freeze-vision",  # every weight must move, the vision tower's too
        ],
    ),
}


# Keys that measure the machine, not the data: wall-clock times (the slowest rank's), throughput and the
# process's peak memory (the highest rank's) differ between one process and two by nature.
MACHINE_KEYS = ("time/", "throughput/", "memory/")
# Counted or summed from the same sampled tokens and rewards (float64 sums in another order).
EXACT_KEYS = ("reward/", "response/", "adv/", "update/", "lr")


def _assert_same_step_metrics(one: Path, two: Path) -> None:
    """Two processes log the one-process run's metrics.jsonl, key by key and step by step: rewards,
    lengths and counts to 1e-12; losses, entropies, cpl/* and grad_norm (float32 passes on batches of
    other shapes: prompts padded with 2 or 4 others) to the weights' own tolerance, rtol 1e-4 (measured
    on the four cases: at most 2.1e-6, grad_norm). Rank 0's rows alone miss by 1e-4 (entropy/mean)
    to 0.5 (cpl/acc)."""
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [m["step"] for m in lines[0]] == [m["step"] for m in lines[1]]
    for a, b in zip(*lines):
        keys = {k for k in a if not k.startswith(MACHINE_KEYS)}
        assert keys == {k for k in b if not k.startswith(MACHINE_KEYS)}, sorted(keys ^ set(b))
        for k in sorted(keys):
            rel, tol = (1e-12, 1e-12) if k.startswith(EXACT_KEYS) else (1e-4, 1e-6)
            want = pytest.approx(a[k], rel=rel, abs=tol)
            assert b[k] == want, f"step {a['step']} {k}: one process {a[k]}, two {b[k]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MULTI_PROCESS_CASES))
def test_two_processes_equal_one_process_on_the_combined_batch(tiny_dir, data, tmp_path, case):
    """torchrun with 2 CPU processes (gloo): both ranks end with the same weights, equal to one process.

    fsdp2*: the environment `accelerate launch` exports for an FSDP config (fsdp_version 2) shards the
    policy over the two processes; the update must still equal the one-process update, and the
    checkpoint it writes must be the full model. fsdp2-bf16: bf16 compute (MixedPrecisionPolicy and
    autocast) over float32 master weights: at lr 1e-6 the update reaches nearly every weight (bf16
    parameters would keep ~1 %); bf16 sampling is not bitwise that of one process, so no comparison."""
    spec = MULTI_PROCESS_CASES[case]
    fsdp, bf16 = spec["fsdp"], spec.get("bf16", False)
    extra = [*spec["extra"], "--seed-per-prompt", "--beta", "0", "--temperature", "1.0"]
    if spec.get("mixed"):
        data = _half_text_only(data, tmp_path / "mixed.jsonl")
        extra += ["--rewards", str(REPO / "tests/workers/length_reward.py") + ":by_length"]
        extra += ["--reward-weights", "1.0", "--max-steps", "3"]
    flags = _flags(tiny_dir, data, tmp_path / "run", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath()}
    if fsdp:
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="true")
    worker = str(REPO / "tests" / "workers" / "ddp_train.py")
    port = str(29517 + list(MULTI_PROCESS_CASES).index(case))
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        worker,
        str(tmp_path / "two"),
        *flags[:5],
        str(tmp_path / "run2"),
        *flags[6:],
    ]
    _run(two, env)
    r0 = torch.load(tmp_path / "two.rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "two.rank1.pt", weights_only=True)
    start, _ = load_model_and_processor(tiny_dir)
    if bf16:
        moved = sum(int((r0[n] != before).sum()) for n, before in start.state_dict().items())
        total = sum(before.numel() for before in start.state_dict().values())
        assert moved / total > 0.99, f"{moved / total:.2%} of the weights moved"
    else:
        one = [sys.executable, worker, str(tmp_path / "one"), *flags[:5], str(tmp_path / "run1"), *flags[6:]]
        _run(one, env)
        single = torch.load(tmp_path / "one.rank0.pt", weights_only=True)
    moved = 0
    for name, before in start.state_dict().items():
        assert torch.equal(r0[name], r1[name]), f"ranks disagree on {name}"
        assert r0[name].dtype == torch.float32, f"{name} is {r0[name].dtype}, not float32 master weights"
        if not bf16:
            torch.testing.assert_close(r0[name], single[name], atol=2e-5, rtol=1e-4, msg=name)
            moved += not torch.equal(single[name], before)
    assert bf16 or moved > 0
    if not bf16:
        _assert_same_step_metrics(tmp_path / "run1", tmp_path / "run2")
    if spec.get("mixed"):  # the view passes really ran in this run
        logged = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
        assert max(m["time/perception"] for m in logged) > 0
    (ckpt,) = sorted((tmp_path / "run2" / "checkpoints").glob("step-*"))
    saved, _ = load_model_and_processor(ckpt)  # the full model, loadable without FSDP
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, r0[name], msg=name)
    if case == "fsdp2":  # its full optimizer state (keyed by name) resumes in one process without FSDP
        resume = [*flags[:5], str(tmp_path / "run2"), *flags[6:], "--resume", "auto"]
        resume[resume.index("--max-steps") + 1] = "3"
        assert train_main(resume) == 0
        lines = (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


@pytest.mark.parametrize(
    "algo, present, absent",
    [
        ("grpo", [], ["cpl/loss", "papo/loss"]),
        ("papo", ["papo/loss", "papo/kl_prcp", "papo/entropy_masked"], ["cpl/loss"]),
    ],
)
def test_grpo_and_papo_are_the_same_loop_with_their_own_terms(
    tiny_dir, data, tmp_path, algo, present, absent
):
    out = tmp_path / algo
    flags = _flags(tiny_dir, data, out, "--algo", algo)
    flags[flags.index("--max-steps") + 1] = "1"
    assert train_main(flags) == 0
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(present) <= set(line), sorted(set(present) - set(line))
    assert not set(absent) & set(line)
    if algo == "papo":
        assert line["papo/kl_prcp"] > 0 and line["time/perception"] > 0  # the masked view really ran
    else:
        assert line["time/perception"] == 0.0  # GRPO runs no view pass


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_a_clean_log(tiny_dir, data, tmp_path):
    """No checkpoint to resume (the earlier run died before writing one): the earlier log is set aside
    as metrics.earlier-1.jsonl and metrics.jsonl holds the new run's steps only, not [1, 2, 1, 2, 3]."""
    out = tmp_path / "run"
    flags = _flags(tiny_dir, data, out, "--algo", "grpo")
    assert train_main(flags) == 0
    shutil.rmtree(out / "checkpoints")  # as if killed before the end-of-run checkpoint
    flags[flags.index("--max-steps") + 1] = "3"
    assert train_main([*flags, "--resume", "auto"]) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    earlier = [json.loads(x)["step"] for x in (out / "metrics.earlier-1.jsonl").read_text().splitlines()]
    assert earlier == [1, 2]


def test_periodic_evaluation_answers_every_item_greedily_and_scores_them_with_the_runs_reward(monkeypatch):
    # the official validation (vbdi/cppo verl ray_trainer._validate): the whole split, one greedy
    # answer each, scored by the training reward; the paper configs: 0.9 x mathruler + 0.1 x format
    from PIL import Image

    from cppo.rl import loop
    from cppo.rl.config import TrainConfig
    from cppo.rl.data import Sample
    from cppo.rl.run import reward_scorer

    cfg = TrainConfig(data="d", eval_limit=None, eval_samples=1, rewards=["accuracy_mathruler", "format"])
    image = Image.new("RGB", (28, 28))
    answers = ["3", "B", "7", "2"] + ["1"] * 96  # 100 items: more than the demo's 64
    dataset = [Sample(i, f"q{i}", a, [image]) for i, a in enumerate(answers)]
    responses = [
        "<think>count</think> \\boxed{3}",  # right, formatted: 0.9 + 0.1 = 1.0
        "<think>read</think> \\boxed{(B) 5}",  # mathruler: wrong (cppo.grading's default: right): 0.1
        "\\boxed{7}",  # right, no think tags: 0.9
        "<think>no answer</think>",  # 0
    ] + ["<think>t</think> \\boxed{1}"] * 96  # 1.0 each
    asked = {}

    def fake_evaluate(model, processor, data, **kwargs):
        asked.update(kwargs)
        n = len(data) if kwargs["limit"] is None else min(kwargs["limit"], len(data))
        questions = [{"answer": data[i].answer, "responses": [responses[i]]} for i in range(n)]
        return {"accuracy": 0.25, "format": 0.5, "questions": questions}

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    metrics = loop._evaluate(None, None, dataset, cfg, 0, 1, reward_scorer(cfg))
    assert asked["limit"] is None and asked["samples"] == 1 and asked["temperature"] is None  # greedy
    assert metrics["eval/reward/total"] == pytest.approx((1.0 + 0.1 + 0.9 + 0.0 + 96) / 100)
    assert metrics["eval/reward/accuracy_mathruler"] == pytest.approx(98 / 100)
    assert metrics["eval/reward/format"] == pytest.approx(98 / 100)
    assert (metrics["eval/accuracy"], metrics["eval/format"]) == (0.25, 0.5)  # the evaluator's own
    assert metrics["eval/reward/errors"] == 0.0
    demo = TrainConfig()  # the demo keeps its 64 items, 4 samples each
    loop._evaluate(None, None, dataset, demo, 0, 1, reward_scorer(demo))
    assert asked["limit"] == 64 and asked["samples"] == 4
