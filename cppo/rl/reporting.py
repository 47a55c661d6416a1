"""What a step reports: its metrics, the rollouts it logs, the run's counters, the progress bar.

    log = StepLogger(run_dir, cfg, rank)     # metrics.jsonl, rollouts.jsonl, reward_errors.jsonl, TB
    log.start(step)                          # the trackers (--report-to), the progress bar
    log.evaluation(0, metrics)               # the held-out evaluation before training
    bad = counters.count(metrics)            # a skipped update makes a bad step
    log.step(step, metrics, ro, bad)         # every file line and tracker, the bar, a stderr line
    log.close()                              # or `with log:`
    log.finish()                             # curves.png, summary.json and the printed summary

A log that cannot be written (a full disk) is a RunDirError naming the file and the checkpoint a
resume continues from: cppo-train's one line and exit 2.

Split from cppo/rl/loop.py so that the loop reads top to bottom on its own: one call a step, and a
logger that does nothing on ranks other than 0, so the loop never branches on logging.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from cppo.rl.atomic import RunDirError
from cppo.rl.checkpoint import latest_checkpoint
from cppo.rl.curves import draw_curves
from cppo.rl.logfiles import LogWriteError, RunLogger, write_failure
from cppo.rl.ranks import Tally
from cppo.rl.summary import SUMMARY_FILE, summarize, summary_text, write_summary
from cppo.rl.trackers import Trackers
from cppo.rl.trackers import resolve as resolve_trackers
from cppo.rl.update import Timer

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's peak resident set (writing
    5 to /proc/self/clear_refs resets VmHWM). Called at the start of every step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or /proc read-only: peak_memory_mb then reports nothing
        pass


def peak_memory_mb(device: torch.device) -> float | None:
    """MiB at the peak since the last `reset_peak_memory`: CUDA memory allocated by tensors, or the
    process's peak resident set on the CPU (Linux); None where no resettable peak can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = _STATUS.read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):  # "VmHWM:   123456 kB"
            return int(line.split()[1]) / 1024
    return None


def step_metrics(ro, timer: Timer, step_time: float, device, world: int) -> dict[str, float]:
    """The step's reward, length, advantage, time, throughput and memory metrics over EVERY process's
    rows (cppo.rl.ranks.Tally; a collective when world > 1, the same dict on every rank): means over
    the step's rows, reward/errors summed, each time/* the highest over ranks (the step waits for it),
    memory/peak_mb the highest rank's, throughput the step's tokens over the slowest rank's time."""
    mask = ro.response_mask  # (N, T) this process's rows
    N = mask.shape[0]
    tally = Tally()
    scored = len(ro.reward_result.total)  # this process's scored responses
    for key, value in ro.reward_result.metrics().items():  # means over them, and an error count
        if key == "reward/errors" or key.startswith("reward/hung/"):  # counts: errors, ranks it hung on
            tally.count(key, value)
        else:
            tally.mean(key, value * scored, scored)
    tally.mean("response/length", float(mask.sum()), N)
    tally.mean("response/clipped", float(ro.truncated.float().sum()), N)  # max_new_tokens, no end token
    tally.mean("adv/positive_frac", float((ro.advantages > 0).float().sum()), N)
    for phase in ("rollout", "reward", "old_ref_logprobs", "update", "perception"):
        tally.max(f"time/{phase}", timer.get(phase, 0.0))
    tally.max("time/step", step_time)
    prompt = ro.inputs["attention_mask"][:, : ro.inputs["prompt_length"]]
    tally.count(_TOKENS, int(mask.sum()) + int(prompt.sum()))
    peak = peak_memory_mb(device)  # since the step began (reset_peak_memory)
    if peak is not None:
        tally.max("memory/peak_mb", peak)
    out = tally.over_ranks(world).values()
    out["throughput/tokens_per_s"] = out.pop(_TOKENS) / out["time/step"]
    return out


_TOKENS = "_tokens"  # the step's prompt and response tokens, for throughput (not logged)


def rollout_rows(ro, n: int) -> list[dict]:
    G = ro.num_rows // max(1, len(ro.samples))
    rows = []
    for i in range(min(n, ro.num_rows)):
        s = ro.samples[i // G]
        rows.append(
            {
                "question": s.question,
                "answer": s.answer,
                "question_type": s.question_type,
                "response": ro.texts[i],
                "reward": float(ro.rewards[i]),
                "advantage": float(ro.advantages[i]),
                "views": ro.view_records[i // G],
            }
        )
    return rows


def reward_error_rows(ro, rank: int) -> list[dict]:
    """The scorer's errors of this step, each with its question (reward_errors.jsonl)."""
    G = ro.num_rows // max(1, len(ro.samples))
    return [
        {**e, "question": ro.samples[e["index"] // G].question, "rank": rank} for e in ro.reward_result.errors
    ]


@dataclass
class Counters:
    """The run's bad-step and best-evaluation counters. A checkpoint stores `asdict()` under "guard"
    (the dict with these keys that older checkpoints hold loads the same)."""

    bad_steps_total: int = 0  # steps with a skipped (non-finite) optimizer update
    bad_streak: int = 0  # of them in a row, up to the last step
    best_step: int = 0  # the step of the best eval/accuracy so far (--keep-best); 0 = none
    best_score: float = -1.0

    def count(self, metrics: dict) -> bool:
        """Count a step from its metrics (and log the counts in them); True when an update was skipped."""
        bad = metrics.get("update/skipped_nonfinite", 0) > 0
        self.bad_steps_total += int(bad)
        self.bad_streak = self.bad_streak + 1 if bad else 0
        metrics["update/bad_steps_total"] = float(self.bad_steps_total)
        metrics["update/bad_streak"] = float(self.bad_streak)
        return bad

    def load(self, saved: dict) -> None:
        """Take the counts of a checkpoint's "guard" dict (keys it lacks keep their values)."""
        for f in fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


def _nonfinite(metrics: dict) -> str:
    """`grpo/pg_loss=nan, grad_norm=nan`: the step's non-finite metrics, i.e. where it went wrong."""
    keys = [f"{k}={v}" for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    return ", ".join(keys) or "no non-finite metric (a non-finite gradient only)"


def report_step(step: int, metrics: dict, ro, bad: bool) -> None:
    """One stderr line for a skipped update or for reward errors (the details are in the run files)."""
    if bad:
        n = int(metrics["update/skipped_nonfinite"])
        print(
            f"[cppo] step {step}: skipped {n} optimizer update(s): non-finite {_nonfinite(metrics)}",
            file=sys.stderr,
        )
    errors = ro.reward_result.errors
    if errors:
        e = errors[0]
        print(
            f"[cppo] step {step}: {len(errors)} reward error(s) scored 0, e.g. {e['reward']}: {e['error']} "
            "(all in reward_errors.jsonl)",
            file=sys.stderr,
        )


def bad_steps_message(step: int, counters: Counters, metrics: dict, run_dir: Path, cfg) -> str:
    latest = latest_checkpoint(run_dir)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
    return (
        f"stopped at step {step}: {counters.bad_streak} consecutive steps with a non-finite loss or gradient "
        f"norm (max_bad_steps {cfg.max_bad_steps}; last: {_nonfinite(metrics)}); {kept}. Lower --lr, check "
        "the rewards and data, then --resume auto"
    )


class Progress:
    """A tqdm bar with the last reward on it; a no-op on non-main ranks."""

    def __init__(self, cfg, start: int, rank: int):
        self.bar = None
        if rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start, desc=f"cppo-train {cfg.algo}", unit="step")

    def update(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                reward=f"{m.get('reward/total', 0):.3f}",
                acc=f"{m.get('reward/accuracy', 0):.2f}",
                cpl=f"{m.get('cpl/loss', 0):.3f}",
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepLogger:
    """Everything a step reports, in one call: its metrics line (metrics.jsonl, TensorBoard), a few
    rollouts, its reward errors, the progress bar, and a stderr line for a skipped update or reward
    errors. The files and the bar are written on rank 0 only (cppo.rl.logfiles.RunLogger)."""

    def __init__(self, run_dir: Path, cfg, rank: int):
        self.cfg, self.rank, self.run_dir = cfg, rank, Path(run_dir)
        tensorboard = cfg.tensorboard or "tensorboard" in resolve_trackers(cfg.report_to)
        with self._writes():
            self.files = RunLogger(run_dir, tensorboard=tensorboard, is_main=rank == 0)
        self.progress: Progress | None = None
        self.trackers = Trackers(run_dir)  # none until the run starts them (start), after config.yaml

    @contextmanager
    def _writes(self):
        """A log write that fails (LogWriteError) says which checkpoint a resume would continue from."""
        try:
            yield
        except LogWriteError as e:
            latest = latest_checkpoint(self.run_dir)
            kept = (
                f"the latest checkpoint {latest} is intact and --resume auto drops the lines logged after it"
                if latest
                else "no checkpoint was written yet"
            )
            raise RunDirError(f"{e}; {kept}. Free space or fix permissions, then resume") from e

    def truncate_after(self, step: int) -> None:
        """On resume: drop the lines logged after `step` (RunLogger.truncate_after)."""
        with self._writes():
            self.files.truncate_after(step)

    def set_aside_earlier_logs(self) -> None:
        """A run starting at step 0: an earlier run's logs in its folder are renamed, not appended
        to (RunLogger.set_aside_earlier_logs), and the move is said on stderr."""
        with self._writes():
            moved = self.files.set_aside_earlier_logs()
        for old, new in moved:
            print(f"[cppo] {old} of an earlier run without a checkpoint to resume -> {new}", file=sys.stderr)

    def start(self, step: int) -> None:
        """Start the trackers of --report-to (a resumed run continues their runs: trackers.json) with
        the resolved config, and open the progress bar at `step`, the step the run starts from."""
        self.trackers = Trackers(self.run_dir, self.cfg, self.rank, resumed=step > 0)
        self.trackers.config(self.cfg.to_dict())
        self.progress = Progress(self.cfg, step, self.rank)

    def evaluation(self, step: int, metrics: dict) -> None:
        """An evaluation outside a training step (step 0: before training) as its own metrics line."""
        with self._writes():
            row = self.files.log(step, metrics)
        self.trackers.log(step, row)

    def step(self, step: int, metrics: dict, ro, bad: bool) -> None:
        """Log the step; RunDirError (one line: the file, the reason, the checkpoint a resume
        continues from) when a log cannot be written."""
        rows = rollout_rows(ro, self.cfg.log_rollouts)
        with self._writes():
            row = self.files.log(step, metrics)
            self.files.log_rollouts(step, rows)
            self.files.log_reward_errors(step, reward_error_rows(ro, self.rank))
        self.trackers.log(step, row)
        every = self.cfg.rollout_table_every
        if every and (step % every == 0 or step == self.cfg.max_steps):
            self.trackers.table(step, rows)
        if self.progress is not None:
            self.progress.update(metrics)
        if self.rank == 0:
            report_step(step, metrics, ro, bad)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        with self._writes():
            self.files.close()

    def __enter__(self) -> StepLogger:
        return self

    def finish(self) -> None:
        """The end of a finished run, on rank 0: curves.png (a failed write is a warning), sent to
        the trackers that take images, which are then closed; summary.json and the printed summary."""
        if self.rank != 0:
            return
        curves = draw_curves(self.run_dir)
        self.trackers.image(curves, self.cfg.max_steps)
        self.trackers.finish()
        try:
            summary = write_summary(self.run_dir, self.cfg)
        except OSError as e:  # the run is complete: its summary can be read from metrics.jsonl
            print(
                f"[cppo] could not write {self.run_dir / SUMMARY_FILE} ({write_failure(e)})", file=sys.stderr
            )
            summary = summarize(self.run_dir, self.cfg)
        print(summary_text(summary), flush=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close; while another error propagates (a checkpoint the full disk refused), a failure to
        flush TensorBoard's last events must not replace it, and the trackers' runs are closed."""
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
            self.trackers.finish()
        except Exception:
            pass
