"""Whose run directory is it: a fresh cppo-train run never writes over an earlier run by accident.

    check_fresh(cfg, run_dir)      # before anything is loaded or written: RunDirError unless the folder
                                   # holds no earlier run, or --resume / --overwrite is given
    clear_earlier_run(run_dir)     # --overwrite, once every check has passed: the earlier run's files go

An earlier run is what cppo-train writes into its folder (`RUN_ENTRIES` and the `*.earlier-K.jsonl`
logs a fresh start sets aside); anything else there (the generated shapes task in `shapes/`, a
user's notes) is neither counted nor deleted. Before this, three runs of different algorithms into
one folder left three `"step": 1` lines in one metrics.jsonl and one checkpoint (issue 17).

`clear_earlier_run` first renames every entry into one hidden folder (`.overwritten-run`; a rename
is atomic, so each entry is either in place or moved whole), then deletes that folder. A refusal
found before it runs deletes nothing; a crash in the middle leaves whole files, in place or in the
hidden folder, which the next --overwrite removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cppo.rl.atomic import fsync_dir
from cppo.rl.checkpoint import CHECKPOINTS_DIR, RunDirError
from cppo.rl.logfiles import METRICS_FILE, REWARD_ERRORS_FILE, ROLLOUTS_FILE

RUN_ENTRIES = (
    "config.yaml",
    METRICS_FILE,
    ROLLOUTS_FILE,
    REWARD_ERRORS_FILE,
    "curves.png",
    "summary.json",
    "trackers.json",
    "tb",
    CHECKPOINTS_DIR,
)
EARLIER_LOGS = "*.earlier-*.jsonl"  # logs a fresh start set aside (cppo.rl.logfiles)
TRASH = ".overwritten-run"


def earlier_run(run_dir: Path) -> list[Path]:
    """The entries of an earlier cppo-train run in `run_dir`, in RUN_ENTRIES order; [] when none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [run_dir / name for name in RUN_ENTRIES if (run_dir / name).exists()]
    return found + sorted(run_dir.glob(EARLIER_LOGS))


def entry_names(entries: list[Path], most: int = 4) -> str:
    """'config.yaml, metrics.jsonl, checkpoints/ and 2 more'."""
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def check_fresh(cfg, run_dir: Path) -> None:
    """Refuse (RunDirError, one line) a fresh run into a folder that holds an earlier run unless
    cfg.resume or cfg.overwrite says what to do with it, and an --overwrite that would delete the
    model, data or preset the run reads. Reads only; writes nothing."""
    run_dir = Path(run_dir)
    found = earlier_run(run_dir)
    if not found or cfg.resume:
        return
    if not cfg.overwrite:
        raise RunDirError(
            f"run directory {run_dir} holds an earlier run ({entry_names(found)}): pass --resume auto to "
            "continue it, --overwrite to delete it and start again, or choose another --output-dir"
        )
    for name in ("model", "data", "eval_data", "preset", "papo_preset"):
        value = getattr(cfg, name, None)
        inside = value and next((p for p in found if _within(Path(str(value).split("@")[0]), p)), None)
        if inside:
            raise RunDirError(
                f"--overwrite would delete {inside}, which holds this run's {name} {value}: copy it "
                "elsewhere first, or choose another --output-dir"
            )


def clear_earlier_run(run_dir: Path) -> list[str]:
    """Delete the earlier run's entries in `run_dir` (module docstring); the names deleted."""
    run_dir = Path(run_dir)
    trash = run_dir / TRASH
    if trash.exists():  # left by an --overwrite killed while deleting
        shutil.rmtree(trash)
    found = earlier_run(run_dir)
    if not found:
        return []
    trash.mkdir()
    for path in found:
        os.replace(path, trash / path.name)
    fsync_dir(run_dir)
    shutil.rmtree(trash)
    return [p.name for p in found]


def _within(path: Path, entry: Path) -> bool:
    """Whether `path` is `entry` or lies under it (both resolved: symlinks and .. followed)."""
    try:
        path, entry = path.expanduser().resolve(), entry.resolve()
    except OSError:
        return False
    return path == entry or entry in path.parents
