"""CPU threads for a run on the CPU: as many as there are cores that other work leaves free, chosen
again before every step.

torch's intra-op pool splits each operation evenly over its threads and waits for the slowest, so
one thread that shares its core with another process holds the others back. Measured on a 2-core
machine, the no-argument run (bench/bench_threads.py, docs/benchmarks.md): 3.9 s a step with 2
threads alone but 14.9 s with one core kept busy by another process, against 6.1 s and 6.5 s with
1 thread. `CpuThreads` reads, before each step, how much CPU the other processes used since the
last step (/proc/stat's busy time less this process's own) and uses the cores they left free: 2
threads alone, 1 while another process keeps a core busy, 2 again once it stops.

`OMP_NUM_THREADS` set by the user fixes the count (nothing is chosen), as does a torch thread count
set before the run; fix it for bit-identical reruns on the CPU, since the count changes the order of
floating-point sums. Without /proc/stat (not Linux) the count stays torch's.
"""

from __future__ import annotations

import os
import time

import torch


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None without it."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuThreads:
    """Chooses torch's thread count before each step (module docstring). `cores`: the cores this
    process may use (its affinity), shared by `local_processes` processes of the run."""

    def __init__(self, local_processes: int = 1):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = max(1, cores // max(1, local_processes))
        # chosen by the user (OMP_NUM_THREADS, or torch.set_num_threads before the run): kept
        chosen = "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() != cores
        self.fixed = chosen or _busy_seconds() is None
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        busy = _busy_seconds()
        return None if busy is None else (time.monotonic(), busy, _own_seconds())

    def others_load(self) -> float:
        """Cores' worth of CPU the other processes used since the last call."""
        now = self._sample()
        last, self._last = self._last, now
        if now is None or last is None or now[0] - last[0] < 0.05:
            return 0.0
        others = (now[1] - last[1]) - (now[2] - last[2])
        return max(0.0, others / (now[0] - last[0]))

    def choose(self) -> int:
        """Set and return the thread count for the next step: the cores the others left free (>= 1)."""
        if self.fixed:
            return torch.get_num_threads()
        free = max(1, self.cores - round(self.others_load()))
        if free != torch.get_num_threads():
            torch.set_num_threads(free)
        return free
