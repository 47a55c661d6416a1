"""Smoke test of bench/bench_checkpointing.py on a tiny setting, so that it cannot rot: one process
per setting runs in this one, and the parent's table is built from two such results. It times
nothing."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = ["--hidden", "64", "--layers", "1", "--prompts", "1", "--group", "2", "--micro", "2", "--mini", "2"]


def test_bench_checkpointing_measures_both_settings(monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_checkpointing", BENCH / "bench_checkpointing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = {}
    for setting in ("off", "on"):
        assert bench.main([*TINY, "--max-new-tokens", "6", "--one", setting]) == 0
        results[setting] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert results[setting]["rows"] == 2 and results[setting]["update_s"] > 0
    monkeypatch.setattr(bench, "_child", lambda args, setting: results[setting])
    assert bench.main([*TINY, "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "| off |" in out and "| on |" in out and "on/off: update time x" in out
