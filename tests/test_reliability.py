"""Faults a training run must survive (issue 7), each injected into a real cppo-train run on a tiny model.

Every run here uses the same flags as the uninterrupted reference run (5 steps, a checkpoint each
step, all kept), so an interrupted-then-resumed run can be compared with it line for line and
tensor for tensor: metrics.jsonl (timings, memory and throughput aside), rollouts.jsonl, the final
weights and the optimizer state. docs/reliability.md lists these tests in a table.
"""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cppo.rl.checkpoint as checkpoint_mod
import cppo.rl.loop as loop_mod
import cppo.rl.run as run_mod
import cppo.rl.update as update_mod
from cli.train import main as train_main
from cppo.rl.checkpoint import MARKER, latest_checkpoint, load_trainer_state
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]
CHAOS = REPO / "tests" / "workers" / "chaos_reward.py"
STEPS = 5
VOLATILE = ("time/", "memory/", "throughput/")


@pytest.fixture(autouse=True)
def _one_thread():
    """The subprocess runs use OMP_NUM_THREADS=1; in-process runs must reduce in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _flags(tiny_dir, data, out, *extra):
    return [
        *("--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out)),
        *("--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "0"),
        *("--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "2"),
        *("--max-new-tokens", "8", "--lr", "1e-3", "--no-tensorboard", "--seed", "0"),
        # CPL on every row (a random tiny model earns no reward, so the A > 0 gate would keep it 0),
        # and a user reward drawing from the global Python/numpy generators, weighted 0 but logged.
        *("--cpl-gate", "none", "--rewards", "accuracy", "format", f"{CHAOS}:noisy"),
        *("--reward-weights", "0.9", "0.1", "0.0"),
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tiny_dir, data, tmp_path_factory):
    """The uninterrupted run every resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    torch.set_num_threads(1)
    assert train_main(_flags(tiny_dir, data, out)) == 0
    return out


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _steps(run: Path) -> list[int]:
    return [r["step"] for r in _metrics(run)]


def _weights(ckpt: Path) -> dict:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_run(run: Path, reference: Path, step: int = STEPS) -> None:
    """Same metrics and rollouts up to `step`, same weights and optimizer state at `step`."""
    want = [r for r in _metrics(reference) if r["step"] <= step]
    assert _metrics(run) == want
    for name in ("rollouts.jsonl",):
        keep = [
            line for line in (reference / name).read_text().splitlines() if json.loads(line)["step"] <= step
        ]
        assert (run / name).read_text().splitlines() == keep, name
    ckpt = f"checkpoints/step-{step:06d}"
    a, b = _weights(run / ckpt), _weights(reference / ckpt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    sa, sb = load_trainer_state(run / ckpt), load_trainer_state(reference / ckpt)
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert sa["sampler"] == sb["sampler"] and sa["scheduler"] == sb["scheduler"]


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath(), "HF_HUB_OFFLINE": "1"}


def _start(flags) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.train", *flags],
        cwd=REPO,
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


# ----------------------------------------------------------------------------------- kill, signals


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(
    tiny_dir, data, reference, tmp_path
):
    k = random.randint(1, STEPS - 1)  # after step k's metrics line: mid-save, or early in step k + 1
    run = tmp_path / "run"
    proc = _start(_flags(tiny_dir, data, run))
    _wait_for_step(proc, run, k)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"k={k}"
    assert latest_checkpoint(run) is not None, f"k={k}: no complete checkpoint after step {k}"
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0, f"k={k}"
    assert_same_run(run, reference)
    assert not list((run / "checkpoints").glob(".tmp-*")), "a killed save's temporary folder was left"


@pytest.mark.slow
def test_sigterm_subprocess_checkpoints_last_completed_step_exits_143_and_resumes_exactly(
    tiny_dir, data, reference, tmp_path
):
    run = tmp_path / "run"
    proc = _start(_flags(tiny_dir, data, run, "--save-every", "0"))
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "--resume auto" in err
    latest = latest_checkpoint(run)
    # Whether the signal landed in a rollout (step abandoned) or an update (step finished), the
    # checkpoint is the last step that was logged.
    assert latest is not None and latest.name == f"step-{_steps(run)[-1]:06d}", err[-2000:]
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    assert_same_run(run, reference)


def test_sigterm_mid_rollout_abandons_the_step_and_saves_the_previous_one(
    tiny_dir, data, reference, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    monkeypatch.setenv("CPPO_TEST_SIGNAL", "TERM:9")  # the noisy reward's 9th call: step 3's rollout
    # --save-every 0: the only checkpoint is the one the signal makes.
    assert train_main(_flags(tiny_dir, data, run, "--save-every", "0")) == 143
    assert "stopped by SIGTERM after step 2" in capsys.readouterr().err
    assert _steps(run) == [1, 2] and latest_checkpoint(run).name == "step-000002"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    monkeypatch.delenv("CPPO_TEST_SIGNAL")
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    assert_same_run(run, reference)


def test_sigint_mid_update_finishes_the_step_saves_it_and_exits_130(
    tiny_dir, data, tmp_path, monkeypatch, capsys
):
    calls = []
    real = loop_mod.policy_update
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup

    def update_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 2 updates the weights
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "policy_update", update_then_ctrl_c)
    run = tmp_path / "run"
    assert train_main(_flags(tiny_dir, data, run, "--save-every", "0")) == 130
    assert "stopped by SIGINT after step 2" in capsys.readouterr().err
    assert _steps(run) == [1, 2] and latest_checkpoint(run).name == "step-000002"
    assert signal.getsignal(signal.SIGINT) is before  # the handlers were restored


# ----------------------------------------------------------------------------------- bad steps


def _nan_loss_at(calls_to_poison):
    """A micro_batch_loss whose n-th calls (1-based) return NaN, as a real overflow would."""
    real, count = update_mod.micro_batch_loss, [0]

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        count[0] += 1
        if calls_to_poison(count[0]):
            loss = loss * float("nan")
            metrics = {**metrics, "grpo/pg_loss": float("nan")}
        return loss, metrics

    return poisoned


def test_one_nan_step_is_skipped_logged_counted_and_the_run_goes_on(
    tiny_dir, data, tmp_path, monkeypatch, capsys
):
    # 2 micro-batches per step: call 3 is step 2's first; its NaN gradient skips step 2's only update.
    monkeypatch.setattr(update_mod, "micro_batch_loss", _nan_loss_at(lambda n: n == 3))
    run = tmp_path / "run"
    assert train_main(_flags(tiny_dir, data, run, "--max-steps", "4")) == 0
    err = capsys.readouterr().err
    assert "step 2: skipped 1 optimizer update(s): non-finite grpo/pg_loss=nan" in err
    rows = _metrics(run)
    assert [r["update/skipped_nonfinite"] for r in rows] == [0, 1, 0, 0]
    assert [r["update/bad_steps_total"] for r in rows] == [0, 1, 1, 1]
    assert [r["update/bad_streak"] for r in rows] == [0, 1, 0, 0]
    # The bad step was not checkpointed, and its skipped update left the weights of step 1 untouched.
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000003", "step-000004"]
    w1, w3 = _weights(run / "checkpoints/step-000001"), _weights(run / "checkpoints/step-000003")
    assert all(torch.isfinite(v).all() for v in w3.values())
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)  # step 3 trained again


def test_consecutive_nan_steps_stop_the_run_with_the_last_good_checkpoint(
    tiny_dir, data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(update_mod, "micro_batch_loss", _nan_loss_at(lambda n: n >= 3))  # from step 2 on
    run = tmp_path / "run"
    assert train_main(_flags(tiny_dir, data, run, "--max-steps", "6", "--max-bad-steps", "2")) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cppo-train: error: stopped at step 3: 2 consecutive steps with a non-finite")
    assert "max_bad_steps 2" in err and "step-000001" in err
    assert _steps(run) == [1, 2, 3]
    assert latest_checkpoint(run).name == "step-000001"
    assert all(torch.isfinite(v).all() for v in _weights(latest_checkpoint(run)).values())


# ----------------------------------------------------------------------------------- rewards, data


def test_reward_that_raises_or_returns_nan_scores_zero_and_is_logged_with_its_sample(
    tiny_dir, data, tmp_path, capsys
):
    run = tmp_path / "run"
    flags = _flags(tiny_dir, data, run, "--max-steps", "2")
    flags[flags.index("--rewards") + 3] = f"{CHAOS}:flaky"
    flags[flags.index("--reward-weights") + 3] = "0.5"
    assert train_main(flags) == 0
    assert "reward error(s) scored 0, e.g. flaky: ValueError" in capsys.readouterr().err
    errors = [json.loads(line) for line in (run / "reward_errors.jsonl").read_text().splitlines()]
    assert [(e["step"], e["reward"]) for e in errors] == [(1, "flaky"), (1, "flaky")]
    assert errors[0]["error"].startswith("ValueError: flaky reward") and "nan" in errors[1]["error"]
    for e in errors:
        assert {"response", "question", "answer", "index", "source"} <= set(e) and e["question"]
    rows = _metrics(run)
    assert rows[0]["reward/errors"] == 2 and rows[1]["reward/errors"] == 0
    assert rows[0]["reward/flaky"] == pytest.approx(0.25)  # (0 + 0 + 0.5 + 0.5) / 4


def _bad_dataset(tmp_path: Path, data: Path) -> Path:
    """Three good samples, then a corrupt image (line 4) and a sample without an answer (line 5)."""
    lines = data.read_text().splitlines()[:3]
    rows = [json.loads(line) for line in lines]
    shutil.copytree(data.parent / "images", tmp_path / "images")  # images stay in the data folder
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    rows.append({**rows[0], "image": str(corrupt)})
    rows.append({k: v for k, v in rows[1].items() if k != "answer"})
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_samples_are_reported_at_start_and_strict_mode_fails_before_the_model_loads(
    tiny_dir, data, tmp_path, monkeypatch, capsys
):
    bad = _bad_dataset(tmp_path, data)
    assert train_main(_flags(tiny_dir, bad, tmp_path / "lenient", "--max-steps", "1")) == 0
    out = capsys.readouterr().out
    assert "3 samples; skipped 2: 1 unreadable image, 1 missing answer" in out
    assert "bad.jsonl:4" in out and "bad.jsonl:5" in out

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(run_mod, "build_policy", no_model)
    assert train_main(_flags(tiny_dir, bad, tmp_path / "strict", "--data-strict")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:4: unreadable image" in err[0] and "strict" in err[0]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(bad.read_text().splitlines()[0] + "\n{not json\n")
    assert train_main(_flags(tiny_dir, broken, tmp_path / "broken")) == 2
    assert "broken.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------- disk


def test_unwritable_output_dir_fails_at_start_with_one_line(tiny_dir, data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file, so nothing can be created under it (even as root)")
    assert train_main(_flags(tiny_dir, data, blocker / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"cppo-train: error: run directory {blocker / 'run'} is not writable"
    )


def test_failed_checkpoint_write_keeps_the_previous_one_and_resume_continues(
    tiny_dir, data, reference, tmp_path, monkeypatch, capsys
):
    real = checkpoint_mod._save_model

    def disk_full_at_step_2(model, directory, state_dict=None):
        if directory.name == ".tmp-step-000002":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, directory, state_dict)

    monkeypatch.setattr(checkpoint_mod, "_save_model", disk_full_at_step_2)
    run = tmp_path / "run"
    assert train_main(_flags(tiny_dir, data, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert "step-000001 is intact" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no temporary left
    monkeypatch.undo()
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    assert_same_run(run, reference)


def test_a_full_disk_writing_config_yaml_is_one_line_and_keeps_the_previous_one(
    tiny_dir, data, reference, tmp_path, monkeypatch, capsys
):
    """config.yaml is rewritten when a run starts (a resume may change safe fields): a full disk there is
    the one-line RunDirError, the earlier config.yaml whole and no temporary left; then a resume works."""
    run = _copy(reference, tmp_path)
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    real = run_mod.atomic_write

    def disk_full_in_config_yaml(path, content, *args, **kwargs):
        if Path(path).name != "config.yaml":
            return real(path, content, *args, **kwargs)

        def half_then_full(tmp):  # part of the file reaches the disk, then the disk is full
            tmp.write_text(content[: len(content) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, half_then_full)

    monkeypatch.setattr(run_mod, "atomic_write", disk_full_in_config_yaml)
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto", "--max-steps", "6")) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("cppo-train")]  # not the load's bar
    assert "Traceback" not in err and len(said) == 1, err
    assert said[0].startswith(f"cppo-train: error: could not write {run / 'config.yaml'} (No space left")
    assert "--resume auto" in said[0]
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not list(run.glob(".config.yaml*")) and _steps(run) == list(range(1, STEPS + 1))
    monkeypatch.undo()
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    assert_same_run(run, reference)


# ----------------------------------------------------------------------------------- resume checks


def test_changed_config_is_refused_with_the_fields_unless_safe_or_forced(
    tiny_dir, data, reference, tmp_path, capsys
):
    run = _copy(reference, tmp_path)
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "config.yaml")}
    changed = _flags(
        tiny_dir, data, run, "--resume", "auto", "--group-size", "4", "--seed", "1", "--algo", "grpo"
    )
    assert train_main(changed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cppo-train: error: refusing to resume from")
    for change in ("group_size 2 -> 4", "seed 0 -> 1", "algo 'cppo' -> 'grpo'", "--force-resume"):
        assert change in err[0]
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing touched
    # Safe fields may change: a longer run with other saving and logging.
    safe = _flags(
        tiny_dir,
        data,
        run,
        "--resume",
        "auto",
        "--max-steps",
        "6",
        "--save-every",
        "3",
        "--log-rollouts",
        "1",
    )
    assert train_main(safe) == 0
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert "max_steps: 6" in (run / "config.yaml").read_text()
    forced = _flags(
        tiny_dir, data, run, "--resume", "auto", "--max-steps", "7", "--seed", "1", "--force-resume"
    )
    assert train_main(forced) == 0 and _steps(run)[-1] == 7


def test_changed_data_contents_at_the_same_path_are_refused(tiny_dir, data, tmp_path, capsys):
    copy = tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    shutil.copytree(data.parent / "images", tmp_path / "images")  # images stay in the data folder
    copy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert train_main(_flags(tiny_dir, copy, run, "--max-steps", "1")) == 0
    rows[0]["answer"] = "a different answer"
    copy.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_main(_flags(tiny_dir, copy, run, "--max-steps", "2", "--resume", "auto")) == 2
    assert "data contents" in capsys.readouterr().err


def test_truncated_checkpoints_are_ignored_by_resume(tiny_dir, data, reference, tmp_path, capsys):
    run = _copy(reference, tmp_path)
    # As a crash mid-copy, a lost file or a cut-short write would leave them:
    (run / "checkpoints/step-000005" / MARKER).unlink()
    (run / "checkpoints/step-000004/model.safetensors").unlink()
    shutil.copytree(run / "checkpoints/step-000003", run / "checkpoints/step-000006")
    with open(run / "checkpoints/step-000006/trainer_state.pt", "r+b") as f:
        f.truncate(100)
    assert train_main(_flags(tiny_dir, data, run, "--resume", str(run / "checkpoints/step-000004"))) == 2
    assert "model.safetensors is missing" in capsys.readouterr().err
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    err = capsys.readouterr().err
    for problem in (
        "step-000004: model.safetensors is missing",
        "step-000005: no COMPLETE",
        "step-000006: trainer_state",
    ):
        assert problem in err
    assert _steps(run) == [1, 2, 3, 4, 5]
    assert_same_run(run, reference)


def test_explicit_resume_from_an_older_checkpoint_refuses_then_deletes_the_newer_ones(
    tiny_dir, data, reference, tmp_path, capsys
):
    run = _copy(reference, tmp_path)
    older = str(run / "checkpoints" / "step-000002")
    assert train_main(_flags(tiny_dir, data, run, "--resume", older)) == 2
    assert "abandons newer checkpoints step-000003, step-000004, step-000005" in capsys.readouterr().err
    assert latest_checkpoint(run).name == "step-000005"
    assert (
        train_main(_flags(tiny_dir, data, run, "--resume", older, "--force-resume", "--max-steps", "3")) == 0
    )
    # The abandoned branch is gone: a later --resume auto continues this branch, not the old step 5.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000001",
        "step-000002",
        "step-000003",
    ]
    assert _steps(run) == [1, 2, 3]
    assert_same_run(run, reference, step=3)


def test_resume_never_unpickles_code_from_a_checkpoint(tiny_dir, data, reference, tmp_path, capsys):
    run = _copy(reference, tmp_path)
    sentinel = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "step-000005"
    torch.save({"step": 5, "payload": _Evil(str(sentinel))}, ckpt / "trainer_state.pt")
    manifest = json.loads((ckpt / MARKER).read_text())  # a tamperer would fix the manifest too
    state_bytes = (ckpt / "trainer_state.pt").read_bytes()
    manifest["files"]["trainer_state.pt"] = len(state_bytes)
    manifest["sha256"]["trainer_state.pt"] = hashlib.sha256(state_bytes).hexdigest()
    (ckpt / MARKER).write_text(json.dumps(manifest))
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 2
    assert "weights_only" in capsys.readouterr().err
    assert not sentinel.exists()


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("code ran",))


def test_lora_run_resumes_its_adapter_exactly(tiny_dir, data, tmp_path):
    pytest.importorskip("peft")
    lora = ("--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--max-steps", "3")
    full = tmp_path / "full"
    assert train_main(_flags(tiny_dir, data, full, *lora)) == 0
    run = tmp_path / "resumed"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step-000003")
    assert train_main(_flags(tiny_dir, data, run, *lora, "--resume", "auto")) == 0
    assert _metrics(run) == _metrics(full)
    a = load_file(run / "checkpoints/step-000003/adapter/adapter_model.safetensors")
    b = load_file(full / "checkpoints/step-000003/adapter/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b) and any(
        v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k
    )
    wa, wb = _weights(run / "checkpoints/step-000003"), _weights(full / "checkpoints/step-000003")
    assert all(torch.equal(wa[k], wb[k]) for k in wb)  # merged weights: base + the same delta


def test_keep_best_keeps_the_best_evaluated_checkpoint_outside_keep_last(
    tiny_dir, data, tmp_path, monkeypatch
):
    """--keep-best: the checkpoint with the best eval/accuracy survives keep_last pruning and
    checkpoints/best.json names it; later, worse evaluations do not replace it."""
    from cppo.rl.checkpoint import best_checkpoint

    scores = iter([0.5, 0.9, 0.2, 0.4])  # steps 1..4: the best is step 2
    monkeypatch.setattr(
        loop_mod, "_evaluate", lambda *a, **k: {"eval/accuracy": next(scores), "eval/format": 1.0}
    )
    out = tmp_path / "run"
    flags = _flags(tiny_dir, data, out)
    flags[flags.index("--max-steps") + 1] = "4"
    flags[flags.index("--keep-last") + 1] = "1"
    assert train_main([*flags, "--eval-every", "1", "--keep-best", "--eval-data", str(data)]) == 0
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-000002", "step-000004"], kept
    assert best_checkpoint(out) == out / "checkpoints" / "step-000002"
    assert json.loads((out / "checkpoints" / "best.json").read_text())["score"] == 0.9
    assert train_main([*_flags(tiny_dir, data, tmp_path / "r2"), "--keep-best"]) == 2  # no eval_every


def test_lora_targets_that_match_no_module_are_one_line_and_nothing_is_trained(
    tiny_dir, data, tmp_path, capsys
):
    run = tmp_path / "run"
    flags = _flags(
        tiny_dir, data, run, "--lora-r", "4", "--lora-targets", "nonexistent_proj", "--max-steps", "1"
    )
    assert train_main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "lora_targets ['nonexistent_proj'] match no module of the model" in err[-1]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
