"""Stopping a run on SIGTERM / SIGINT: `StopSignals`, `AbortStep` and `RunInterrupted`.

`StopSignals` turns the first SIGTERM/SIGINT into a request the loop honours after the step (or at
once, as `AbortStep`, inside a section that changes no weights), and a second one into
KeyboardInterrupt; the loop checkpoints the last completed step and raises `RunInterrupted`, whose
`exit_code` (128 + signal: 143 / 130) cppo-train exits with.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch


class RunInterrupted(Exception):
    """SIGTERM/SIGINT stopped the run after its last completed step was checkpointed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class AbortStep(BaseException):
    """Raised by the signal handler inside an abortable section (BaseException: reward code that
    catches Exception cannot swallow it)."""


class StopSignals:
    """SIGTERM and SIGINT handling for the loop (installed on the main thread only).

    The first signal raises AbortStep inside `abortable()` sections, else sets a flag that
    `requested()` reads after the step; a second signal raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._abortable = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
        self.signum = signum
        name = signal.Signals(signum).name
        if self._abortable:
            self._abortable = False
            print(
                f"\n[cppo] {name}: abandoning this step's rollout, saving the last completed step",
                file=sys.stderr,
            )
            raise AbortStep()
        print(f"\n[cppo] {name}: finishing this step, then saving and stopping", file=sys.stderr)

    @contextmanager
    def abortable(self, enabled: bool = True):
        self._abortable = enabled
        try:
            yield
        finally:
            self._abortable = False

    def requested(self, world: int, device) -> bool:
        """Whether any process got a signal (an all-reduce with several processes, so all stop together)."""
        flag = self.signum is not None
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.signum is None:
                self.signum = signal.SIGTERM
        return flag

    def interrupted(self, step: int, saved: Path | None) -> RunInterrupted:
        name = signal.Signals(self.signum).name
        where = f"checkpoint {saved}" if saved else "no new checkpoint (no step completed)"
        return RunInterrupted(
            self.signum, f"stopped by {name} after step {step}; {where}; continue with --resume auto"
        )
