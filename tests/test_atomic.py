"""cppo.rl.atomic: atomic_write replaces a file or a folder whole, fsyncs it and its parent, and
leaves the old version and no temporary sibling when the write fails."""

from __future__ import annotations

import os

import pytest

import cppo.rl.atomic as atomic_mod
from cppo.rl.atomic import atomic_write


def test_text_and_bytes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    assert atomic_write(path, "algo: cppo  # é\n") == path
    assert path.read_text(encoding="utf-8") == "algo: cppo  # é\n"
    atomic_write(path, b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_the_file_and_its_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name the fsynced descriptors")
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic_mod.os, "fsync", record)
    atomic_write(tmp_path / "best.json", "{}\n")
    assert synced == [str(tmp_path / ".best.json.tmp"), str(tmp_path)]


def test_a_folder_replaces_a_folder_every_file_fsynced(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(atomic_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    final = tmp_path / "step-000002"
    final.mkdir()
    (final / "stale.bin").write_bytes(b"old")

    def write(tmp):
        (tmp / "sub").mkdir(parents=True)
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")

    atomic_write(final, write, tmp=tmp_path / ".tmp-step-000002")
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == ["a.bin", "sub", "sub/b.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]  # no .tmp-, no .old-
    assert len(calls) >= 2 + 3  # two files, the temporary folder, its subfolder, the parent


def test_a_failed_write_keeps_the_old_version_and_removes_the_temporary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')

    def half_then_fail(tmp):
        tmp.write_text('{"step": 1}\n{"st')
        raise KeyboardInterrupt  # any exception, even a second signal

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_temporary_left_by_a_killed_writer_is_replaced(tmp_path):
    (tmp_path / ".curves.png.tmp").write_bytes(b"torn")
    (tmp_path / ".tmp-step-000001").mkdir()
    (tmp_path / ".tmp-step-000001" / "torn").write_bytes(b"x")
    atomic_write(tmp_path / "curves.png", b"png")
    atomic_write(tmp_path / "step-000001", lambda tmp: tmp.mkdir(), tmp=tmp_path / ".tmp-step-000001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "step-000001"]
    assert not any((tmp_path / "step-000001").iterdir())
