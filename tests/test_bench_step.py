"""Smoke tests of bench/bench_step.py and bench/bench_scaling.py on a tiny setting, so they cannot rot.

They check that the scripts run and report what docs/benchmarks.md quotes; they time nothing.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench_step():
    return _load("bench_step")


def test_bench_step_runs_and_reports_every_variant(bench_step, tmp_path, capsys):
    out = tmp_path / "step.json"
    argv = "--repeats 1 --prompts 2 --group 2 --max-new-tokens 6 --micro 2 --mini 2 --hidden 32 --no-memory"
    assert bench_step.main([*argv.split(), "--ablate-share", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["variants"]) == {"grpo", "cppo_official", "cppo", "grpo_noshare", "cppo_noshare"}
    for v in res["variants"].values():
        assert v["step"][0] > 0 and v["tokens_per_s"][0] > 0
        assert v["step"][0] >= v["rollout"][0] + v["update"][0] - 1e-9
    assert res["variants"]["grpo"]["perception"][0] == 0.0
    # every row of a micro-batch whose gate opens at all, against only the selected rows
    assert res["variants"]["cppo_official"]["cpl_rows"][0] >= res["variants"]["cppo"]["cpl_rows"][0]
    assert res["tokens_per_step"] > 4 * 6
    assert "**step ÷ GRPO**" in capsys.readouterr().out


def test_scaling_rollouts_have_fixed_length_and_views(bench_step):
    scaling = _load("bench_scaling")
    from tests.helpers import tiny_model_and_processor

    model, processor = tiny_model_and_processor()
    samples = bench_step.make_samples(1, 112, 0)
    ro = scaling.synthetic_rollouts(processor, samples, 4, 16, model.config.image_token_id, seed=0)
    assert ro.response_ids.shape == (4, 16) and bool(ro.response_mask.all())
    assert ro.views["negative"].shape == ro.pixel_values.shape  # held once per prompt, as the images
    assert not torch.equal(ro.views["negative"], ro.pixel_values)
    assert 0 < int((ro.advantages > 0).sum()) < 4
