"""What a run writes as it goes: metrics.jsonl, rollouts.jsonl, reward_errors.jsonl, TensorBoard
scalars (curves.png at the end: cppo.rl.curves).

    log = RunLogger(run_dir, tensorboard=cfg.tensorboard, is_main=rank == 0)
    log.truncate_after(resumed_step)           # on resume: drop lines from after the checkpoint
    for step in ...:
        log.log(step, metrics)                 # one JSON line, flushed and fsynced
        log.log_rollouts(step, rows)           # a sample of rollouts, one JSON object each
        log.log_reward_errors(step, errors)    # each reward that raised or gave NaN, with its sample
    log.close()

The logger is a no-op on non-zero ranks (`is_main=False`), so the loop never branches on logging.
Each call opens the file in append mode, writes one whole line, flushes, fsyncs and closes it: a
crash loses at most the line being written, and `truncate_after` can swap the file underneath
without a stale handle. A torn last line (a kill mid-write) is cut off when the logger starts, and
`read_metrics` skips it. NaN and inf are written as JSON's usual extensions (`NaN`, `Infinity`),
which Python's `json` reads back: a bad step is logged, not hidden.

A write that fails (a full disk, permissions; whatever the writer raises, TensorBoard's included) is
a `LogWriteError` (a RunDirError: cppo-train's one line and exit 2) naming the file, and a JSONL file
is cut back to its size before the write, so no part of a line stays. A resume then drops every
line after its checkpoint (`truncate_after`), so the logs go on as if the run had not stopped.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from cppo.rl.atomic import RunDirError, atomic_write, fsync_dir

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
REWARD_ERRORS_FILE = "reward_errors.jsonl"


def _plain(value):
    """A JSON-ready value: tensors and numpy scalars to Python numbers, arrays to lists, else str."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class LogWriteError(RunDirError):
    """A log of the run (metrics.jsonl, rollouts.jsonl, reward_errors.jsonl, TensorBoard) could not
    be written; the message names it and the reason."""


def write_failure(e: BaseException) -> str:
    """One line for a writer's exception: the OS's words for an OSError, else its first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@contextmanager
def _writing(path: Path, rollback: bool = True):
    """A write to `path` that fails, whatever the writer raises, is a LogWriteError; with `rollback`
    the file is cut back to its size before the write (removed if it did not exist), so a full disk
    leaves no part of a line."""
    size = path.stat().st_size if rollback and path.is_file() else None
    existed = path.exists()
    try:
        yield
    except Exception as e:
        if rollback:
            try:
                if size is not None:
                    os.truncate(path, size)
                elif not existed:
                    path.unlink(missing_ok=True)
            except OSError:
                pass  # the line is torn at worst: cut on the next start (_cut_torn_tail)
        raise LogWriteError(f"could not write {path} ({write_failure(e)})") from e


def _append_lines(path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    with _writing(path), open(path, "ab") as f:  # one write of whole lines
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _quiet_tensorboard_threads() -> None:
    """Wrap threading.excepthook so that it drops exceptions of TensorBoard's writer thread.

    That thread re-raises a failed write (a full disk) with a traceback on stderr, while the main
    thread gets the same exception at its next write or flush (a LogWriteError, one line); every
    other thread's exceptions go to the hook that was there."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write killed midway), so the next append starts clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _rewrite_keeping(path: Path, max_step: int) -> None:
    """Atomically rewrite a JSONL file with only the lines whose step is <= max_step."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        kept = [
            line for line in f if line.endswith("\n") and (s := _step_of(line)) is not None and s <= max_step
        ]
    atomic_write(path, "".join(kept))


class RunLogger:
    """Metrics and rollout samples of one run, on the main process only (else every method does nothing)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.metrics_path = self.run_dir / METRICS_FILE
        self.rollouts_path = self.run_dir / ROLLOUTS_FILE
        self.reward_errors_path = self.run_dir / REWARD_ERRORS_FILE
        self.tb_dir = self.run_dir / "tb"
        self._tb = None
        self._failed = False  # a write failed: close() drops TensorBoard's buffered events quietly
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in self._jsonl_paths:
            with _writing(path, rollback=False):
                _cut_torn_tail(path)
        if tensorboard:
            self._tb = self._open_tensorboard(purge_step=None)

    @property
    def _jsonl_paths(self) -> tuple[Path, ...]:
        return (self.metrics_path, self.rollouts_path, self.reward_errors_path)

    def _open_tensorboard(self, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: scalars go to metrics.jsonl only
            return None
        _quiet_tensorboard_threads()
        with _writing(self.tb_dir, rollback=False):
            return SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge_step)

    def _close_tensorboard(self) -> None:
        """Flush and close the TensorBoard writer; after a failed write, drop it without a word (its
        failure is being reported)."""
        tb, self._tb = self._tb, None
        if tb is None:
            return
        if self._failed:
            try:
                tb.close()
            except Exception:
                pass
            return
        with _writing(self.tb_dir, rollback=False):
            tb.close()

    def log(self, step: int, metrics: dict[str, float]) -> dict:
        """Append `{"step": step, **metrics}` to metrics.jsonl (flushed, fsynced) and to TensorBoard;
        returns that row (as the file holds it)."""
        row = {"step": int(step), **{str(k): _plain(v) for k, v in metrics.items()}}
        if not self.is_main:
            return row
        self._append(self.metrics_path, [json.dumps(row)])
        if self._tb is not None:
            with self._failing(), _writing(self.tb_dir, rollback=False):
                for key, value in row.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self._tb.add_scalar(key, value, int(step))
                self._tb.flush()
        return row

    def _append(self, path: Path, lines: list[str]) -> None:
        with self._failing():
            _append_lines(path, lines)

    @contextmanager
    def _failing(self):
        """Remember a failed write, so that close() does not report TensorBoard's copy of it."""
        try:
            yield
        except BaseException:
            self._failed = True
            raise

    def log_rollouts(self, step: int, rows: list[dict]) -> None:
        """Append one JSON object per rollout (`step` first, then the row's keys) to rollouts.jsonl."""
        if not self.is_main or not rows:
            return
        lines = [json.dumps({"step": int(step), **_plain(row)}, ensure_ascii=False) for row in rows]
        self._append(self.rollouts_path, lines)

    def log_reward_errors(self, step: int, rows: list[dict]) -> None:
        """Append one JSON object per failed reward call (reward name, error, response, sample) to
        reward_errors.jsonl; nothing is created while no reward fails."""
        if not self.is_main or not rows:
            return
        lines = [json.dumps({"step": int(step), **_plain(row)}, ensure_ascii=False) for row in rows]
        self._append(self.reward_errors_path, lines)

    def truncate_after(self, step: int) -> None:
        """Keep only lines with step <= `step` in metrics.jsonl, rollouts.jsonl and reward_errors.jsonl
        (on resume).

        Each file is rewritten to a temporary file, fsynced and renamed over the old one, so a crash
        here leaves either the old or the new file. TensorBoard events after `step` are purged too.
        """
        if not self.is_main:
            return
        for path in self._jsonl_paths:
            with _writing(path, rollback=False):  # atomic: the old file or the new one
                _rewrite_keeping(path, int(step))
        if self._tb is not None:
            self._close_tensorboard()
            self._tb = self._open_tensorboard(purge_step=int(step) + 1)

    def set_aside_earlier_logs(self) -> list[tuple[str, str]]:
        """For a run that starts at step 0 in a folder holding an earlier run's logs (say, one killed
        before its first checkpoint): rename each non-empty log to ``NAME.earlier-K.jsonl`` (the
        first free K) instead of appending to it, and drop the earlier TensorBoard events. Returns
        the (old, new) names moved."""
        if not self.is_main:
            return []
        moved = []
        for path in self._jsonl_paths:
            if not path.is_file() or path.stat().st_size == 0:
                continue
            k = 1
            while (target := path.with_name(f"{path.stem}.earlier-{k}{path.suffix}")).exists():
                k += 1
            with _writing(path, rollback=False):
                os.replace(path, target)
            moved.append((path.name, target.name))
        if moved:
            with _writing(self.run_dir, rollback=False):
                fsync_dir(self.run_dir)
            if self._tb is not None:
                self._close_tensorboard()
                self._tb = self._open_tensorboard(purge_step=1)
        return moved

    def close(self) -> None:
        """Close TensorBoard's writer (LogWriteError if its last events cannot be written)."""
        self._close_tensorboard()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl, in file order; a torn or unparseable last line is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a write cut short by a kill
            raise ValueError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}") from None
    return rows
