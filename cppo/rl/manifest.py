"""A checkpoint's COMPLETE manifest: written last, it lists every other file with its size and sha256.

    write_marker(tmp_folder, step)     # after every other file is written, before the folder is renamed
    manifest_problem(ckpt)             # cheap: the marker is valid, every file it lists has its size
    content_problem(ckpt)              # reads every byte: each file's sha256 against the manifest's

`COMPLETE` holds `{"step": N, "files": {path: size}, "sha256": {path: hex digest}}` (paths relative
to the checkpoint, the sharded layout's `shards/*` included). The size check runs whenever
checkpoints are listed (latest_checkpoint, pruning, messages), so it must stay cheap; it catches a
missing or cut-short file. The hash check catches what keeps the size (bytes changed in place: a bad
disk, a stray write) and reads every byte, so it runs only where a checkpoint is about to be
trusted: when a run resumes from it (cppo.rl.resume). A marker of the older `step N` form, or a
manifest without `sha256`, is checked as far as it goes (sizes, or nothing).

Why sha256 over every file is affordable: it is computed right after the files are written, so it
reads them from the page cache, and the files are hashed in parallel threads (hashlib releases the
GIL). sha256 runs at 1.5-2 GB/s per core with the SHA extensions most x86 CPUs have; on this
project's 2-core CI machine, busy with other work, it ran at 0.4-0.6 GB/s, and blake2b, sha1 and md5
were no faster (xxhash would be, but it is not a dependency, and a digest `sha256sum` can check is
worth keeping). The demo model's checkpoint (8.3 MiB with its AdamW state) hashes in ~30 ms there,
beside a ~200 ms save. A 7B run with fp32 master weights and AdamW writes ~85 GB a checkpoint:
sharded (FSDP, one file per process) that is ~85 GB / (threads x 1.5 GB/s), seconds to tens of
seconds; unsharded, trainer_state.pt (the ~56 GB AdamW state) is one file on one core, ~30-60 s,
about what writing it costs. A resume reads the files once more to verify them, which also warms the
page cache for the load that follows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MARKER = "COMPLETE"
_OLD_MARKER = re.compile(r"^step \d+\s*$")  # before the manifest: `step N`
_CHUNK = 8 << 20  # bytes read at a time: large enough that hashlib hashes it without the GIL


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file's bytes (`sha256sum` gives the same)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _sha256_all(directory: Path, names: list[str]) -> dict[str, str]:
    """{name: sha256} of the files `names` under `directory`, hashed in parallel threads."""
    if not names:
        return {}
    workers = max(1, min(len(names), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(names, pool.map(lambda name: file_sha256(directory / name), names)))


def write_marker(directory: Path, step: int) -> None:
    """The COMPLETE manifest (sizes and sha256) of every file under `directory`; written last."""
    directory = Path(directory)
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER]
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in paths}
    manifest = {"step": int(step), "files": sizes, "sha256": _sha256_all(directory, list(sizes))}
    (directory / MARKER).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(ckpt: Path) -> dict:
    """The manifest in `ckpt/COMPLETE` (`{}` for the older `step N` marker); ValueError when the
    marker is neither (cut short, overwritten, edited by hand)."""
    text = (Path(ckpt) / MARKER).read_text(encoding="utf-8", errors="replace")
    if _OLD_MARKER.match(text):
        return {}
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{MARKER} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{MARKER} is not a manifest (JSON, not an object)")
    files, digests = manifest.get("files"), manifest.get("sha256", {})
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        raise ValueError(f"{MARKER} is not a manifest (no {{path: size}} files)")
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise ValueError(f"{MARKER} is not a manifest (sha256 is not {{path: digest}})")
    return manifest


def manifest_problem(ckpt: Path) -> str | None:
    """Why the files of `ckpt` do not match its manifest's names and sizes, or None. Cheap (stat only)."""
    marker = Path(ckpt) / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (a save that did not finish)"
    try:
        files = read_manifest(ckpt).get("files", {})
    except (OSError, ValueError) as e:
        return f"{e}: its manifest is damaged"
    for name, size in files.items():
        path = Path(ckpt) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated)"
    return None


def content_problem(ckpt: Path, names: list[str] | None = None) -> str | None:
    """Why a checkpoint whose sizes match (`manifest_problem` is None) has other bytes than it was
    saved with: the first file whose sha256 differs from its manifest's, or None. Reads every file,
    or only `names` (one process's share: cppo.rl.checkpoint.checkpoint_corruption)."""
    try:
        digests = read_manifest(ckpt).get("sha256", {})
        if names is not None:
            digests = {name: digests[name] for name in names if name in digests}
        found = _sha256_all(Path(ckpt), list(digests))
    except (OSError, ValueError) as e:
        return f"its files cannot be read to check their sha256 ({e})"
    for name, want in digests.items():
        if found[name] != want:
            return f"{name} does not match the sha256 its {MARKER} manifest records (changed after the save)"
    return None
