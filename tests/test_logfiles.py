"""cppo.rl.logfiles: metrics lines on disk at once, resume truncation, non-main no-op, curves."""

from __future__ import annotations

import errno
import json
import math

import numpy as np
import pytest
import torch

from cppo.rl.atomic import RunDirError
from cppo.rl.curves import moving_average, plot_curves
from cppo.rl.logfiles import LogWriteError, RunLogger, read_metrics
from tests.helpers import FillsUp


def _lines(path):
    with open(path, encoding="utf-8") as f:  # a handle of our own, not the logger's
        return [json.loads(line) for line in f]


def test_log_appends_a_flushed_line_per_step(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    log.log(1, {"reward/total": 0.5, "loss": torch.tensor(2.0), "n": np.int64(3)})
    assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "reward/total": 0.5, "loss": 2.0, "n": 3}]
    log.log(2, {"reward/total": float("nan")})
    rows = _lines(tmp_path / "metrics.jsonl")  # still before close()
    assert [r["step"] for r in rows] == [1, 2] and math.isnan(rows[1]["reward/total"])
    log.close()


def test_torn_last_line_is_cut_on_start_and_skipped_by_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')  # killed mid-write
    assert read_metrics(path) == [{"step": 1, "a": 1}]
    log = RunLogger(tmp_path, tensorboard=False)
    log.log(2, {"a": 2})
    assert read_metrics(path) == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]


def test_read_metrics_names_a_broken_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_truncate_after_keeps_exactly_the_steps_up_to_k(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    for step in range(1, 8):
        log.log(step, {"x": step * 10})
        log.log_rollouts(
            step, [{"question": "q", "response": f"r{step}-{i}", "reward": 1.0} for i in range(2)]
        )
    log.truncate_after(4)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in _lines(tmp_path / "rollouts.jsonl")] == [1, 1, 2, 2, 3, 3, 4, 4]
    log.log(5, {"x": -1})  # the resumed run appends after the kept lines, through a fresh handle
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")][-2:] == [(4, 40), (5, -1)]
    assert not list(tmp_path.glob(".*.tmp"))
    log.close()


def test_rollouts_are_one_readable_object_each(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    rows = [
        {
            "question": "Wie viele?",
            "answer": "3",
            "response": "<think>…</think>\\boxed{3}",
            "reward": 1.0,
            "advantage": torch.tensor(0.7071),
            "view": "noise",
        },
        {"question": "q2", "answer": "4", "response": "5", "reward": 0.0, "advantage": -0.5},
    ]
    log.log_rollouts(9, rows)
    out = _lines(tmp_path / "rollouts.jsonl")
    assert list(out[0])[:3] == ["step", "question", "answer"] and out[0]["step"] == 9
    assert out[0]["view"] == "noise" and out[0]["advantage"] == pytest.approx(0.7071)
    assert "…" in (tmp_path / "rollouts.jsonl").read_text(encoding="utf-8")  # not \u-escaped


def test_non_main_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    log = RunLogger(run, tensorboard=True, is_main=False)
    log.log(1, {"x": 1.0})
    log.log_rollouts(1, [{"question": "q"}])
    log.truncate_after(0)
    log.close()
    assert not run.exists()


def test_tensorboard_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    with RunLogger(tmp_path, tensorboard=True) as log:
        log.log(1, {"reward/total": 0.25, "note": "skipped: nan loss"})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_moving_average_ignores_nan():
    values = np.array([1.0, 3.0, np.nan, 5.0])
    # window 3, centred: [1,3], [1,3,-], [3,-,5], [-,5]  (the NaN is not counted)
    assert np.allclose(moving_average(values, 3), [2.0, 2.0, 4.0, 5.0])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("algo", ["grpo", "cppo"])
def test_curves_png_for_grpo_and_cppo_runs(tmp_path, algo):
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, 31):
        row = {
            "step": step,
            "reward/total": step / 30 + 0.1 * rng.random(),
            "reward/accuracy": step / 40,
            "entropy/mean": 1.0 - step / 60,
        }
        if algo == "cppo":
            row |= {"cpl/loss": 0.5 - step / 100, "cpl/mask_frac": 0.2}
        rows.append(row)
    metrics = _write(tmp_path / "metrics.jsonl", rows)
    out = plot_curves(metrics, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left


def test_a_fresh_start_sets_an_earlier_runs_logs_aside(tmp_path):
    """A run killed before its first checkpoint, then started again (nothing to resume): its log is
    renamed, never appended to, so metrics.jsonl holds one run's steps."""
    import json

    from cppo.rl.logfiles import RunLogger

    first = RunLogger(tmp_path, tensorboard=False)
    first.log(1, {"x": 1.0})
    first.log(2, {"x": 2.0})
    first.close()
    again = RunLogger(tmp_path, tensorboard=False)
    assert again.set_aside_earlier_logs() == [("metrics.jsonl", "metrics.earlier-1.jsonl")]
    again.log(1, {"x": 3.0})
    again.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    kept = [json.loads(x)["step"] for x in (tmp_path / "metrics.earlier-1.jsonl").read_text().splitlines()]
    assert kept == [1, 2]
    assert RunLogger(tmp_path, tensorboard=False).set_aside_earlier_logs() == [
        ("metrics.jsonl", "metrics.earlier-2.jsonl")
    ]


# ------------------------------------------------- writes that fail (a full disk)


def test_a_failed_append_names_the_file_and_leaves_no_part_of_a_line(tmp_path, monkeypatch):
    import cppo.rl.logfiles as logfiles_mod

    log = RunLogger(tmp_path, tensorboard=False)
    log.log(1, {"x": 1.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(logfiles_mod, "open", lambda *a, **k: FillsUp(open(*a, **k)), raising=False)
    with pytest.raises(LogWriteError) as info:
        log.log(2, {"x": 2.0})
    assert str(info.value) == f"could not write {tmp_path / 'metrics.jsonl'} (No space left on device)"
    assert isinstance(info.value, RunDirError)  # cppo-train's one line and exit 2
    assert (tmp_path / "metrics.jsonl").read_bytes() == before  # half a line was written, then cut
    with pytest.raises(LogWriteError, match="rollouts.jsonl"):
        log.log_rollouts(2, [{"question": "q", "response": "r" * 100}])
    assert not (tmp_path / "rollouts.jsonl").exists()  # a file the failed write created is removed
    log.close()


def test_a_tensorboard_write_that_fails_is_a_log_write_error_and_close_stays_quiet(tmp_path):
    pytest.importorskip("tensorboard")
    log = RunLogger(tmp_path, tensorboard=True)

    def full():
        raise RuntimeError("event file: No space left on device\nmore detail")

    log._tb.flush = full  # what the writer raises on a full disk (its own or an OSError)
    with pytest.raises(LogWriteError, match=r"could not write .*tb \(RuntimeError: event file: No space"):
        log.log(1, {"x": 1.0})
    log._tb.close = full
    log.close()  # after a failed write: TensorBoard's buffered events are dropped, not reported twice
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_tensorboards_writer_thread_prints_no_traceback(monkeypatch):
    """The writer thread re-raises a failed write (the main thread gets it too): its copy is dropped,
    other threads' exceptions still reach the hook that was installed."""
    import threading

    from cppo.rl.logfiles import _quiet_tensorboard_threads

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.thread.name))
    _quiet_tensorboard_threads()
    _quiet_tensorboard_threads()  # installed once

    class _AsyncWriterThread(threading.Thread):  # the name TensorBoard's writer thread has
        def run(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    class Other(threading.Thread):
        def run(self):
            raise ValueError("not ours to hide")

    for cls, name in ((_AsyncWriterThread, "tb"), (Other, "other")):
        t = cls(name=name)
        t.start()
        t.join()
    assert seen == ["other"]


def test_curves_that_cannot_be_written_are_a_warning(tmp_path, monkeypatch, capsys):
    import cppo.rl.curves as curves_mod

    _write(tmp_path / "metrics.jsonl", [{"step": 1, "reward/total": 0.5}])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(curves_mod, "plot_curves", full)
    assert curves_mod.draw_curves(tmp_path) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write" in err[0] and "No space left on device" in err[0]
    assert curves_mod.draw_curves(tmp_path / "no-run") is None  # no metrics: nothing to draw
