import math
import sys

import pytest

from cppo.rl.rewards import REWARDS, RewardScorer, get_reward, load_user_function, register_reward

GOOD = "<think>two halves</think> so \\boxed{\\frac{1}{2}}"
SAMPLE = {"question": "q", "source": "data.jsonl:7"}


@pytest.mark.parametrize("name", REWARDS.names())
def test_every_registered_reward_follows_the_calling_convention(name):
    value = get_reward(name)(GOOD, "0.5", dict(SAMPLE))
    assert isinstance(value, float) and 0.0 <= value <= 1.0


def test_default_weights_give_point_nine_accuracy_plus_point_one_format():
    scorer = RewardScorer(["accuracy", "format"], [0.9, 0.1])
    responses = [GOOD, "\\boxed{0.5}", "<think>x</think> \\boxed{3}", "no answer"]
    result = scorer(responses, ["0.5"] * 4, [dict(SAMPLE)] * 4)
    assert result.components == {"accuracy": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]}
    assert result.total == pytest.approx([1.0, 0.9, 0.1, 0.0])
    assert result.metrics()["reward/total"] == pytest.approx(0.5)  # (1 + .9 + .1 + 0) / 4
    assert result.metrics()["reward/accuracy"] == 0.5 and result.errors == []


def test_unknown_reward_lists_the_valid_names():
    with pytest.raises(
        ValueError,
        match="unknown reward 'acc'; valid: accuracy, accuracy_mathruler, format, or a user function",
    ):
        get_reward("acc")


def test_the_official_reward_is_accuracy_mathruler_and_format_at_point_nine_and_point_one():
    pytest.importorskip("mathruler.grader")
    scorer = RewardScorer(["accuracy_mathruler", "format"], [0.9, 0.1])
    responses = [GOOD, "<think>x</think> \\boxed{2/4}", "\\boxed{4 \\text{ or } 5}"]
    result = scorer(responses, ["0.5", "1/2", "4"], [dict(SAMPLE)] * 3)
    # mathruler refuses an unreduced a/b and reads "4 \text{ or } 5" as "4" (docs/rewards.md)
    assert result.components == {"accuracy_mathruler": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0]}
    assert result.total == pytest.approx([1.0, 0.1, 0.9]) and result.errors == []
    assert "reward/accuracy_mathruler" in result.metrics()


def test_a_missing_mathruler_stops_the_run_at_its_config_not_as_zero_rewards(monkeypatch):
    from cppo.rl.config import ConfigError, TrainConfig

    monkeypatch.delitem(sys.modules, "mathruler.grader", raising=False)
    monkeypatch.setitem(sys.modules, "mathruler", None)
    message = "the mathruler grader needs the mathruler package: pip install 'cppo\\[grading\\]'"
    with pytest.raises(ImportError, match=message):
        get_reward("accuracy_mathruler")
    with pytest.raises(ValueError, match=message):
        RewardScorer(["accuracy_mathruler", "format"], [0.9, 0.1])
    with pytest.raises(ConfigError, match="rewards: " + message):
        TrainConfig(rewards=["accuracy_mathruler", "format"])
    RewardScorer(["accuracy", "format"], [0.9, 0.1])  # the default reward needs none of it


def test_user_reward_from_a_file_path(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def length_bonus(response, answer, sample):\n"
        "    return min(1.0, len(response) / 100) + (sample['question'] == 'q')\n"
    )
    spec = f"{tmp_path / 'my_rewards.py'}:length_bonus"
    scorer = RewardScorer(["format", spec], [0.5, 2.0])
    assert scorer.names == ["format", "length_bonus"]
    result = scorer(["x" * 50], ["a"], [dict(SAMPLE)])
    assert result.components["length_bonus"] == [1.5]  # 50/100 + True
    assert result.total == [3.0]  # 0.5 * 0 + 2.0 * 1.5


def test_user_reward_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "rewardmod_xyz.py").write_text("def one(response, answer, sample):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert get_reward("rewardmod_xyz:one")("r", "a", {}) == 1
    finally:
        sys.modules.pop("rewardmod_xyz", None)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nowhere/missing.py:f", "file nowhere/missing.py does not exist"),
        ("no_such_module_abc:f", "cannot import module 'no_such_module_abc'"),
        ("math:no_such_fn", "math has no function 'no_such_fn'"),
    ],
)
def test_bad_user_reward_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        load_user_function(spec)


def test_a_raising_or_nan_reward_scores_zero_and_is_recorded_not_fatal(tmp_path):
    (tmp_path / "flaky.py").write_text(
        "def flaky(response, answer, sample):\n"
        "    if response == 'boom':\n"
        "        raise RuntimeError('grader exploded')\n"
        "    if response == 'nan':\n"
        "        return float('nan')\n"
        "    if response == 'none':\n"
        "        return None\n"
        "    return 1.0\n"
    )
    scorer = RewardScorer(["accuracy", f"{tmp_path / 'flaky.py'}:flaky"], [1.0, 1.0])
    samples = [{"source": f"data.jsonl:{i}"} for i in range(4)]
    result = scorer(["ok", "boom", "nan", "none"], ["x"] * 4, samples)
    assert result.components["flaky"] == [1.0, 0.0, 0.0, 0.0]
    assert all(math.isfinite(t) for t in result.total)
    assert [(e["index"], e["source"]) for e in result.errors] == [
        (1, "data.jsonl:1"),
        (2, "data.jsonl:2"),
        (3, "data.jsonl:3"),
    ]
    assert (
        "RuntimeError: grader exploded" in result.errors[0]["error"]
        and result.errors[0]["response"] == "boom"
    )
    assert "nan" in result.errors[1]["error"] and result.metrics()["reward/errors"] == 3.0


def test_register_reward_adds_a_name_once():
    @register_reward("test_always_half")
    def half(response, answer, sample):
        return 0.5

    try:
        assert RewardScorer(["test_always_half"], [2.0])(["r"], ["a"], [{}]).total == [1.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_always_half")(half)
    finally:
        REWARDS.unregister("test_always_half")


def test_weights_must_match_functions():
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"):
        RewardScorer(["accuracy", "format"], [1.0])


# --- reward code that misbehaves (docs/reliability.md): scored 0 and logged, never an exit or a hang


def _hostile(kind):
    def fn(response, answer, sample):
        if kind == "sleeps":
            import time

            time.sleep(30)
        if kind == "exits":
            sys.exit(0)
        if kind == "interrupts":
            raise KeyboardInterrupt
        return {"string": "0.75", "bool": True, "none": None, "inf": math.inf}[kind]

    return fn


@pytest.mark.parametrize("kind", ["sleeps", "exits", "interrupts", "string", "bool", "none", "inf"])
def test_a_reward_that_hangs_exits_or_returns_a_non_number_scores_zero_and_is_logged(kind):
    register_reward(f"hostile_{kind}")(_hostile(kind))
    try:
        scorer = RewardScorer(["format", f"hostile_{kind}"], [1.0, 1.0], timeout_s=0.5)
        result = scorer([GOOD, GOOD], ["0.5", "0.5"], [dict(SAMPLE)] * 2)
    finally:
        REWARDS.unregister(f"hostile_{kind}")
    assert result.components[f"hostile_{kind}"] == [0.0, 0.0]
    assert result.total == [1.0, 1.0]  # the other reward still counts
    assert [e["index"] for e in result.errors] == [0, 1]
    expected = {"sleeps": "TimeoutError", "exits": "SystemExit", "interrupts": "KeyboardInterrupt"}
    assert expected.get(kind, "ValueError") in result.errors[0]["error"]


def test_numpy_scalars_are_real_numbers_and_the_next_step_runs_on_a_fresh_thread_after_a_timeout():
    import numpy as np

    calls = []

    def slow_once(response, answer, sample):
        calls.append(1)
        if len(calls) == 1:
            import time

            time.sleep(5)
        return np.float32(0.25)

    register_reward("slow_once")(slow_once)
    try:
        scorer = RewardScorer(["slow_once"], [1.0], timeout_s=0.3)
        first = scorer(["a", "b"], ["x", "x"], [dict(SAMPLE)] * 2)
        second = scorer(["a", "b"], ["x", "x"], [dict(SAMPLE)] * 2)  # the next step
    finally:
        REWARDS.unregister("slow_once")
    assert first.components["slow_once"] == [0.0, 0.0]  # timed out, then its other call of the step skipped
    assert first.hung == ["slow_once"] and "not run" in first.errors[1]["error"]
    assert second.components["slow_once"] == [0.25, 0.25]  # the stuck thread was replaced
    assert second.hung == [] and len(calls) == 3


def test_a_reward_that_never_returns_costs_a_step_one_time_limit_not_one_per_response():
    """128 responses (the default step) with a function that sleeps forever: one timeout, the other
    127 calls skipped and logged, the other function scored as usual."""
    import threading
    import time

    calls = []

    def never(response, answer, sample):
        calls.append(1)
        threading.Event().wait()

    register_reward("never")(never)
    try:
        scorer = RewardScorer(["format", "never"], [0.1, 0.9], timeout_s=0.5)
        t0 = time.perf_counter()
        result = scorer([GOOD] * 128, ["0.5"] * 128, [dict(SAMPLE)] * 128)
        elapsed = time.perf_counter() - t0
    finally:
        REWARDS.unregister("never")
    assert elapsed < 0.5 + 2.0  # one time limit, not 128 of them (64 s)
    assert len(calls) == 1 and result.hung == ["never"]
    assert result.components["format"] == [1.0] * 128 and result.components["never"] == [0.0] * 128
    assert len(result.errors) == 128 and "TimeoutError" in result.errors[0]["error"]
    assert all("not run: never timed out earlier in this step" in e["error"] for e in result.errors[1:])
    assert result.metrics()["reward/hung/never"] == 1.0 and result.metrics()["reward/hung/format"] == 0.0


def test_a_function_that_returned_before_it_timed_out_did_not_hang():
    calls = []

    def late_hang(response, answer, sample):
        calls.append(1)
        if len(calls) == 2:
            import threading

            threading.Event().wait()
        return 1.0

    register_reward("late_hang")(late_hang)
    try:
        result = RewardScorer(["late_hang"], [1.0], timeout_s=0.3)(["a"] * 4, ["x"] * 4, [dict(SAMPLE)] * 4)
    finally:
        REWARDS.unregister("late_hang")
    assert result.components["late_hang"] == [1.0, 0.0, 0.0, 0.0] and len(calls) == 2
    assert result.hung == []


def test_hang_watch_counts_steps_in_a_row_and_a_dropped_function_is_not_called():
    from cppo.rl.rewards import HangWatch, hung_reward_message

    watch = HangWatch(["a", "b"], steps=2)
    hung = {"reward/hung/a": 1.0, "reward/hung/b": 0.0}
    assert watch.update(hung) == []
    assert watch.update({"reward/hung/a": 0.0, "reward/hung/b": 2.0}) == []  # a's streak broken
    assert watch.update(hung) == []
    assert watch.update({"reward/hung/a": 1.0, "reward/hung/b": 1.0}) == ["a"]  # b's streak is 1
    assert HangWatch(["a"], steps=0).update(hung) == []  # 0: never

    calls = []
    register_reward("counted")(lambda r, a, s: calls.append(1) or 1.0)
    try:
        scorer = RewardScorer(["format", "counted"], [1.0, 1.0])
        scorer.drop("counted")
        result = scorer([GOOD, GOOD], ["0.5", "0.5"], [dict(SAMPLE)] * 2)
        line = hung_reward_message(scorer, "counted", 3)
    finally:
        REWARDS.unregister("counted")
    assert calls == [] and result.components["counted"] == [0.0, 0.0] and result.total == [1.0, 1.0]
    assert (
        "reward function counted (" in line and "test_rewards.py:" in line and "--drop-hung-rewards" in line
    )
