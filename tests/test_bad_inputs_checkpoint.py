"""Checkpoints a run cannot trust and files it cannot write (issue 18, points 2 and 4), each in a real
cppo-train run on the tiny model of tests/test_reliability.py and compared with its uninterrupted
reference run.

- A checkpoint changed in place (same size: the weights, the trainer state) is moved aside with one
  warning by --resume auto, which uses the one before; one with a damaged COMPLETE is skipped as
  incomplete; one named with --resume is refused with one line and exit 2.
- A full disk while a checkpoint or a log line is written, whatever the writer raises, is one line
  and exit 2 with the previous checkpoint intact, and --resume auto afterwards (space freed) ends as
  the uninterrupted run: metrics.jsonl holds steps [1, ..., 5] once each.

- Under several processes each hashes a share of the files; rank 0 alone moves a checkpoint; every
  process takes the same choice.

Faults come from patched writers, and where this process may mount a tmpfs (root), from a real full
disk. Every case asserts the exit status, the one line and that no traceback was printed.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cppo.rl.checkpoint as checkpoint_mod
import cppo.rl.logfiles as logfiles_mod
import cppo.rl.loop as loop_mod
from cli.train import main as train_main
from cppo.rl.checkpoint import (
    checkpoint_corruption,
    checkpoint_dir,
    hash_shares,
    latest_checkpoint,
    save_checkpoint,
)
from cppo.rl.manifest import read_manifest
from tests import test_reliability as reliability
from tests.helpers import FillsUp, repo_pythonpath, tiny_model_and_processor
from tests.test_reliability import STEPS, _copy, _flags, _steps, assert_same_run

# tests/test_reliability.py's fixtures, used here as there: the uninterrupted reference run (once per
# module), and one torch thread (in-process runs must reduce in the same order as the reference).
reference = reliability.reference
_one_thread = reliability._one_thread


def _one_error(err: str) -> str:
    """The one `cppo-train:` line of a failed run's stderr, which holds no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("cppo-train:")]
    assert len(lines) == 1, lines
    return lines[0]


def _flip_byte(path: Path) -> None:
    """Change one byte in the middle of a file in place, its size kept (a bad disk, a stray write)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- corrupted checkpoints


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_a_checkpoint_changed_in_place_is_set_aside_and_the_one_before_used(
    tiny_dir, data, reference, tmp_path, capsys, name
):
    run = _copy(reference, tmp_path)
    ckpt = run / "checkpoints" / "step-000005"
    _flip_byte(ckpt / name)  # the size is kept: only the sha256 in COMPLETE tells
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "corrupted checkpoint" in line]
    assert warnings == [
        f"[cppo] skipping corrupted checkpoint {ckpt}: {name} does not match the sha256 its COMPLETE "
        "manifest records (changed after the save); moved to step-000005.corrupt, trying the one before"
    ]
    assert f"resumed from {run / 'checkpoints' / 'step-000004'} at step 4" in out
    assert (run / "checkpoints" / "step-000005.corrupt" / name).is_file()  # kept for inspection
    assert_same_run(run, reference)  # step 5 trained again from step 4: the same weights


def test_a_checkpoint_with_a_damaged_manifest_is_skipped(tiny_dir, data, reference, tmp_path, capsys):
    run = _copy(reference, tmp_path)
    ckpt = run / "checkpoints" / "step-000005"
    (ckpt / "COMPLETE").write_text('{"step": 5, "files": {"model.safeten')  # cut short
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("[cppo] ignoring")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"[cppo] ignoring incomplete checkpoint {ckpt}: COMPLETE is not valid JSON"
    )
    assert_same_run(run, reference)


def test_resume_from_a_named_corrupted_checkpoint_is_refused_with_one_line(
    tiny_dir, data, reference, tmp_path, capsys
):
    run = _copy(reference, tmp_path)
    ckpt = run / "checkpoints" / "step-000005"
    _flip_byte(ckpt / "model.safetensors")
    before = {p: p.read_bytes() for p in run.glob("*.jsonl")}
    assert train_main(_flags(tiny_dir, data, run, "--resume", str(ckpt))) == 2
    assert _one_error(capsys.readouterr().err) == (
        f"cppo-train: error: cannot resume from {ckpt}: model.safetensors does not match the sha256 its "
        "COMPLETE manifest records (changed after the save); give another checkpoint or --resume auto"
    )
    assert {p: p.read_bytes() for p in run.glob("*.jsonl")} == before  # nothing touched, nothing moved
    assert ckpt.is_dir() and not list(run.glob("checkpoints/*.corrupt"))


# ----------------------------------------------------------------------------- a full disk, patched


@pytest.mark.parametrize("fault_step", [1, 3])
def test_a_full_disk_in_torch_save_is_one_line_then_resume_equals_the_uninterrupted_run(
    tiny_dir, data, reference, tmp_path, monkeypatch, capsys, fault_step
):
    """torch.save's zip writer raises RuntimeError ('unexpected pos') on a full disk. At step 1 there
    is no earlier checkpoint: the resume starts over, the earlier logs set aside (before, it appended
    to them: steps [1, 1, 2, ...])."""
    real = torch.save

    def full(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).parent.name == f".tmp-step-{fault_step:06d}":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 889536 vs 889428")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_mod.torch, "save", full)
    run = tmp_path / "run"
    assert train_main(_flags(tiny_dir, data, run)) == 2
    line = _one_error(capsys.readouterr().err)
    assert line.startswith(f"cppo-train: error: could not write checkpoint {run}/checkpoints/step-00000")
    assert "unexpected pos 889536" in line
    kept = "no earlier checkpoint" if fault_step == 1 else f"step-{fault_step - 1:06d} is intact"
    assert kept in line
    assert _steps(run) == list(range(1, fault_step + 1))  # the step was logged before its checkpoint
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step-{s:06d}" for s in range(1, fault_step)]  # no temporary folder left
    monkeypatch.undo()
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    assert _steps(run) == list(range(1, STEPS + 1))
    assert_same_run(run, reference)


def test_a_full_disk_while_logging_metrics_is_one_line_then_resume_equals_the_uninterrupted_run(
    tiny_dir, data, reference, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"

    def open_metrics_full_at_step_3(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if Path(path) == metrics and "a" in mode and len(metrics.read_text().splitlines()) == 2:
            return FillsUp(f)
        return f

    monkeypatch.setattr(logfiles_mod, "open", open_metrics_full_at_step_3, raising=False)
    assert train_main(_flags(tiny_dir, data, run)) == 2
    assert _one_error(capsys.readouterr().err) == (
        f"cppo-train: error: could not write {metrics} (No space left on device); the latest checkpoint "
        f"{run / 'checkpoints' / 'step-000002'} is intact and --resume auto drops the lines logged after "
        "it. Free space or fix permissions, then resume"
    )
    assert metrics.read_text().endswith("\n") and _steps(run) == [1, 2]  # half a line written, then cut
    assert latest_checkpoint(run).name == "step-000002"
    monkeypatch.undo()
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    assert_same_run(run, reference)


# ----------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 96 MiB tmpfs (root only), unmounted afterwards; skipped where mounting is refused."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(disk)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(path: Path, leave: int) -> None:
    """Write zeros to `path` until the disk is full, then give back `leave` bytes."""
    chunk = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as f:
        try:
            while f.write(chunk):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    os.truncate(path, max(0, path.stat().st_size - leave))


@pytest.mark.parametrize("leave, fails", [(64 << 10, "checkpoint"), (0, "log")])
def test_a_real_full_disk_is_one_line_then_resume_equals_the_uninterrupted_run(
    tiny_dir, data, reference, small_disk, monkeypatch, capsys, leave, fails
):
    """During step 3 the disk fills up, leaving 64 KiB (enough for the step's log lines, not its
    checkpoint: safetensors or torch.save fail) or nothing (a log line fails)."""
    filler, real, calls = small_disk / "filler", loop_mod.policy_update, []

    def fill_during_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            _fill(filler, leave)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "policy_update", fill_during_step_3)
    run = small_disk / "run"
    assert train_main(_flags(tiny_dir, data, run)) == 2
    line = _one_error(capsys.readouterr().err)
    if fails == "checkpoint":
        assert line.startswith(f"cppo-train: error: could not write checkpoint {run}/checkpoints/step-000003")
        assert "No space left on device" in line and "step-000002 is intact" in line
    else:
        assert line.startswith(f"cppo-train: error: could not write {run}/")
        assert ".jsonl (No space left on device)" in line and "step-000002 is intact" in line
    assert latest_checkpoint(run).name == "step-000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.undo()
    filler.unlink()  # space freed
    assert train_main(_flags(tiny_dir, data, run, "--resume", "auto")) == 0
    assert _steps(run) == list(range(1, STEPS + 1))
    assert_same_run(run, reference)


# ----------------------------------------------------------------------------- several processes


def test_hash_shares_balance_bytes_largest_file_first():
    # a 10 -> share 0; b 7 -> 1; c 5 -> 1 (7 < 10); d 4 -> 0 (10 < 12); e 1 -> 1 (12 < 14): 14 and 13 bytes
    sizes = {"e": 1, "d": 4, "c": 5, "b": 7, "a": 10}
    assert hash_shares(sizes, 2) == [["a", "d"], ["b", "c", "e"]]
    assert hash_shares(sizes, 1) == [["a", "b", "c", "d", "e"]]
    assert hash_shares({"x": 3}, 3) == [["x"], [], []]  # more processes than files: some hash nothing


def test_a_corrupted_file_is_found_by_the_process_whose_share_holds_it(tmp_path):
    model, processor = tiny_model_and_processor()
    ckpt = save_checkpoint(tmp_path, 1, model, processor, None, None, {"step": 1})
    shares = hash_shares(read_manifest(ckpt)["files"], 2)
    _flip_byte(ckpt / shares[1][0])
    found = f"{shares[1][0]} does not match the sha256"
    assert checkpoint_corruption(ckpt, 0, 2) is None  # rank 0's share is intact
    assert checkpoint_corruption(ckpt, 1, 2).startswith(found)
    assert checkpoint_corruption(ckpt).startswith(found)  # one process: every file, as before


def test_the_processes_hash_a_share_each_and_all_resume_from_the_checkpoint_they_agreed_on(tmp_path):
    """Each of two processes hashes its share of a checkpoint's files (hash_shares: balanced by size,
    each file once); a byte flipped in a file of rank 1's share is found, rank 0 alone warns and moves
    the checkpoint aside, and both resume from the one before (no process reads a folder rank 0 is
    moving); a checkpoint named with --resume is refused on both, from rank 1's verdict."""
    model, processor = tiny_model_and_processor()
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(run, step, model, processor, None, None, {"step": step}, keep_last=0)
    sizes = {name: size for name, size in read_manifest(checkpoint_dir(run, 3))["files"].items()}
    shares = hash_shares(sizes, 2)
    flipped = shares[1][0]  # the largest file of rank 1's share
    _flip_byte(checkpoint_dir(run, 3) / flipped)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"]
    cmd += [str(reliability.REPO / "tests" / "workers" / "resume_ranks.py"), str(run), str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, cwd=reliability.REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("skipping corrupted checkpoint") == 1  # rank 0's warning only
    assert f"{flipped} does not match the sha256" in done.stderr
    got = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    for r in (0, 1):  # step 3 (corrupted) then step 2, each process its own share of each
        want = sorted([folder, name] for folder in ("step-000002", "step-000003") for name in shares[r])
        assert got[r]["hashed_auto"] == want
        assert got[r]["hashed_named"] == sorted(["step-000003.corrupt", name] for name in shares[r])
    assert sorted(name for share in shares for name in share) == sorted(sizes)  # every file once
    assert abs(sum(sizes[n] for n in shares[0]) - sum(sizes[n] for n in shares[1])) <= max(sizes.values())
    same = ("ckpt", "step", "refused")
    assert [got[0][k] for k in same] == [got[1][k] for k in same]
    assert got[0]["ckpt"] == str(checkpoint_dir(run, 2)) and got[0]["step"] == 2
    assert f"{flipped} does not match the sha256" in got[0]["refused"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000001",
        "step-000002",
        "step-000003.corrupt",
    ]
