"""CpuThreads: the thread count follows the cores other processes leave free; a user's choice is kept."""

import pytest
import torch

from cppo.rl import threads
from cppo.rl.flags import build_parser


class FakeMachine:
    """A 2-core machine's clocks: wall time, all processes' busy CPU seconds, this process's own."""

    def __init__(self):
        self.wall, self.busy, self.own = 100.0, 50.0, 10.0

    def run(self, seconds: float, others_cores: float, own_cores: float) -> None:
        self.wall += seconds
        self.own += own_cores * seconds
        self.busy += (others_cores + own_cores) * seconds


@pytest.fixture
def machine(monkeypatch):
    m = FakeMachine()
    monkeypatch.setattr(threads, "_busy_seconds", lambda: m.busy)
    monkeypatch.setattr(threads, "_own_seconds", lambda: m.own)
    monkeypatch.setattr(threads.time, "monotonic", lambda: m.wall)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the count torch starts with on 2 cores: not a user's choice
    yield m
    torch.set_num_threads(before)


def test_threads_follow_the_cores_others_leave_free(machine):
    chooser = threads.CpuThreads()
    assert not chooser.fixed and chooser.cores == 2
    machine.run(5.0, others_cores=0.0, own_cores=2.0)  # alone
    assert chooser.choose() == 2 and torch.get_num_threads() == 2
    machine.run(5.0, others_cores=1.0, own_cores=1.0)  # another process keeps one core busy
    assert chooser.choose() == 1 and torch.get_num_threads() == 1
    machine.run(5.0, others_cores=2.0, own_cores=0.3)  # both cores busy: still one thread, never 0
    assert chooser.choose() == 1
    machine.run(5.0, others_cores=0.1, own_cores=1.0)  # the other work stopped: back to both cores
    assert chooser.choose() == 2 and torch.get_num_threads() == 2


def test_two_local_processes_share_the_cores(machine):
    chooser = threads.CpuThreads(local_processes=2)
    machine.run(5.0, others_cores=1.0, own_cores=1.0)  # the other rank is one of the "others"
    assert chooser.cores == 1 and chooser.choose() == 1


def test_omp_num_threads_fixes_the_count(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    chooser = threads.CpuThreads()
    machine.run(5.0, others_cores=1.0, own_cores=1.0)
    assert chooser.fixed and chooser.choose() == 2 and torch.get_num_threads() == 2


def test_help_says_how_to_set_the_threads():
    text = build_parser().format_help()
    assert "OMP_NUM_THREADS" in text and "cores that other processes leave free" in " ".join(text.split())
