"""The transformers releases cppo accepts, checked once before a command loads a model.

    check_transformers()            # raises ModelError (one line) below the floor
    transformers_problem("5.16.1")  # the line, or None for an accepted version

The floor is the lowest release the suite runs against (`.ci/run` runs the image-dependent tests
a second time on it, `scripts/test_floor.sh`), not a guess: transformers changes Qwen2.5-VL's
signatures between minor releases, and an argument a release does not know lands in `**kwargs`
and is dropped without a word. 5.17 is the release of the GPU machine images this project is run
on; older 5.x releases are refused rather than trusted untested.
"""

from __future__ import annotations

import re

from cppo.models.model_dir import ModelError

TRANSFORMERS_FLOOR = "5.17.0"


def _release(version: str) -> tuple[int, ...]:
    """(5, 17, 0) of "5.17.0", "5.17.0.dev0" or "5.17rc1": the numeric release only."""
    found = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version.strip())
    if found is None:
        raise ValueError(f"not a release number: {version!r}")
    return tuple(int(x or 0) for x in found.groups())


def transformers_problem(version: str, floor: str = TRANSFORMERS_FLOOR) -> str | None:
    """The one line that refuses `version` of transformers, or None when it is at least `floor`."""
    if _release(version) >= _release(floor):
        return None
    return (
        f"transformers {version} is installed; cppo needs transformers>={floor} (older releases drop "
        f"arguments Qwen2.5-VL needs without an error): pip install 'transformers>={floor}'"
    )


def installed_transformers() -> str:
    """The version of the transformers that imports here."""
    import transformers

    return transformers.__version__


def check_transformers() -> None:
    """Raise ModelError with one line when the installed transformers is below the floor."""
    problem = transformers_problem(installed_transformers())
    if problem is not None:
        raise ModelError(problem)
