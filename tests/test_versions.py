"""transformers below the floor is refused with one line before any model loads; at or above, accepted.

The floor itself is exercised by scripts/test_floor.sh (run by .ci/run): the image-dependent tests
on transformers 5.17.0."""

import pytest
import transformers

from cli.train import main as train_main
from cppo.models import load_model_and_processor, versions
from cppo.models.model_dir import ModelError
from cppo.models.versions import TRANSFORMERS_FLOOR, check_transformers, transformers_problem


@pytest.mark.parametrize(
    "version,accepted",
    [
        ("5.17.0", True),
        ("5.17.1", True),
        ("5.25.0", True),
        ("5.17.0.dev0", True),
        ("6.0.0rc1", True),
        ("5.16.1", False),
        ("5.9.0", False),  # 9 < 17 as numbers, not as text
        ("4.57.6", False),
    ],
)
def test_releases_at_or_above_the_floor_are_accepted(version, accepted):
    problem = transformers_problem(version, floor="5.17.0")
    assert (problem is None) == accepted
    if not accepted:
        assert problem.startswith(f"transformers {version} is installed; cppo needs transformers>=5.17.0")
        assert "\n" not in problem and "pip install 'transformers>=5.17.0'" in problem


def test_the_installed_release_is_accepted():
    assert versions.installed_transformers() == transformers.__version__
    assert transformers_problem(transformers.__version__) is None
    check_transformers()


def test_the_loader_refuses_a_release_below_the_floor(monkeypatch):
    monkeypatch.setattr(versions, "installed_transformers", lambda: "5.16.1")
    with pytest.raises(
        ModelError, match=f"transformers 5.16.1 is installed; cppo needs transformers>={TRANSFORMERS_FLOOR}"
    ):
        load_model_and_processor("no/such/model")  # refused before the path is even looked at


def test_cppo_train_refuses_it_with_one_line_before_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(versions, "installed_transformers", lambda: "5.16.1")
    out = tmp_path / "run"
    assert train_main(["--output-dir", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"cppo-train: error: transformers 5.16.1 is installed; cppo needs transformers>={TRANSFORMERS_FLOOR} "
        f"(older releases drop arguments Qwen2.5-VL needs without an error): "
        f"pip install 'transformers>={TRANSFORMERS_FLOOR}'"
    ]
    assert not out.exists()  # nothing was made
