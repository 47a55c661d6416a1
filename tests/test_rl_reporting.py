"""The run's counters and the one-call step logger (cppo/rl/reporting.py)."""

from dataclasses import asdict

from cppo.rl.config import TrainConfig
from cppo.rl.reporting import Counters, StepLogger


def test_counters_count_bad_steps_and_streaks_into_the_metrics():
    c = Counters()
    steps = [{"update/skipped_nonfinite": n} for n in (0.0, 1.0, 2.0, 0.0)]
    assert [c.count(m) for m in steps] == [False, True, True, False]
    assert [m["update/bad_steps_total"] for m in steps] == [0.0, 1.0, 2.0, 2.0]
    assert [m["update/bad_streak"] for m in steps] == [0.0, 1.0, 2.0, 0.0]


def test_counters_load_the_guard_dict_of_a_checkpoint_and_save_the_same_keys():
    old = {"bad_steps_total": 3, "bad_streak": 1, "best_step": 8, "best_score": 0.75}  # "guard"
    c = Counters()
    c.load(old)
    assert asdict(c) == old
    partial = Counters()
    partial.load({"bad_steps_total": 2})  # a key it lacks keeps its start value
    assert asdict(partial) == {"bad_steps_total": 2, "bad_streak": 0, "best_step": 0, "best_score": -1.0}


def test_step_logger_writes_nothing_on_other_ranks(tmp_path):
    log = StepLogger(tmp_path / "run", TrainConfig(tensorboard=False), rank=1)
    log.start(0)
    log.close()
    assert not (tmp_path / "run").exists()
