"""Crash-safe file replacement: `atomic_write` and `fsync_dir`, used for every file a run rewrites
(checkpoints, checkpoints/best.json, config.yaml, the log files cut on resume, curves.png).

    atomic_write(run_dir / "config.yaml", to_yaml(cfg))          # text (UTF-8) or bytes
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png"))
    atomic_write(final, write_checkpoint_folder, tmp=root / ".tmp-step-000007")   # a whole folder
    atomic_write(final, write_the_rest, tmp=shared_tmp, fresh=False)   # a folder others wrote into

The content goes to a hidden temporary sibling (`.NAME.tmp` unless `tmp` is given), which is
fsynced (a folder: every file and folder in it), renamed over the target, and the parent folder is
fsynced: a kill at any moment leaves the old version or the new one, whole, and at worst a
temporary sibling that the next write of the same target removes. `fresh=False` keeps what is in
the temporary folder already (written there by other processes: an FSDP checkpoint's shards,
cppo.rl.sharded) and adds to it; the folder is still fsynced, renamed, or removed on failure.
`RunDirError` is what the trainer raises, whatever the library's own exception, when a file of the
run cannot be written.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


class RunDirError(OSError):
    """The run directory, a checkpoint or a log in it cannot be written; the message (one line) names
    it and says what to do. cppo-train reports it with exit status 2."""


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync `root` if a file; else every file, then every folder (deepest first), under and including it."""
    if not root.is_dir():
        with open(root, "rb") as f:
            os.fsync(f.fileno())
        return
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(
    path: Path, content: str | bytes | Callable[[Path], object], tmp: Path | None = None, fresh: bool = True
) -> Path:
    """Replace `path` by `content` so that a crash leaves either the old `path` or the new one.

    `content`: text (written as UTF-8), bytes, or a function that writes the temporary path it is
    given, as a file or as a folder it creates. A folder replaces an existing folder at `path` by
    moving it aside to `.old-NAME`, renaming, then deleting it. The parent folder must exist. On
    any failure the temporary sibling is removed and the error re-raised; `path` is untouched.
    `fresh=False`: `tmp` exists already (a folder) and `content` adds to it."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f".{path.name}.tmp")
    if fresh:
        _remove(tmp)  # left by a process killed while writing
    try:
        if isinstance(content, str):
            tmp.write_bytes(content.encode("utf-8"))
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        _fsync_tree(tmp)
        if tmp.is_dir() and path.is_dir():  # os.replace cannot rename over a non-empty folder
            old = path.with_name(f".old-{path.name}")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise
    return path
