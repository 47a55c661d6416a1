"""cppo.rl.checkpoint: atomic save/load of a tiny model, pruning, failed saves; the sharded layout
(cppo.rl.sharded) in one process (two processes: tests/test_rl_fsdp.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch

from cppo.models import load_model_and_processor
from cppo.rl.checkpoint import (
    RunDirError,
    check_writable,
    checkpoint_corruption,
    checkpoint_problem,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from cppo.rl.sharded import export_sharded, is_sharded_checkpoint, load_shards, save_sharded_checkpoint
from tests.helpers import shapes_batch, tiny_model_and_processor


def _tiny_training_state():
    model, processor = tiny_model_and_processor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for p in model.parameters():  # one step so AdamW has moments to restore
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    sched.step()
    return model, processor, opt, sched


def _save(run_dir, step, model, processor, opt=None, sched=None, keep_last=2, **extra):
    state = {"step": step, "sampler": {"epoch": 0, "offset": step}, **extra}
    return save_checkpoint(run_dir, step, model, processor, opt, sched, state, keep_last=keep_last)


def test_save_load_round_trip(tmp_path):
    model, processor, opt, sched = _tiny_training_state()
    ckpt = _save(tmp_path, 7, model, processor, opt, sched, config={"algo": "cppo", "lr": 1e-3})
    assert ckpt == tmp_path / "checkpoints" / "step-000007" and (ckpt / "COMPLETE").is_file()
    assert latest_checkpoint(tmp_path) == ckpt
    assert list(ckpt.glob("*.safetensors"))

    loaded, loaded_proc = load_model_and_processor(ckpt)
    _, batch = shapes_batch(loaded_proc, n=2)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)

    state = load_trainer_state(ckpt)
    assert state["step"] == 7 and state["sampler"] == {"epoch": 0, "offset": 7}
    assert state["config"] == {"algo": "cppo", "lr": 1e-3}
    # The resume order: build optimizer and scheduler, then load the optimizer's state (it carries the
    # current lr; building the scheduler resets it), then the scheduler's.
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 10))
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == pytest.approx(2e-4)  # 1e-3 * 2/10
    moments = [s["exp_avg"] for s in opt.state.values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt2.state.values()))
    assert opt2.state[next(iter(opt2.state))]["step"] == 1


def test_trainer_state_that_weights_only_refuses_fails_before_writing(tmp_path):
    model, processor = tiny_model_and_processor()
    with pytest.raises(TypeError, match="weights_only"):
        _save(tmp_path, 1, model, processor, config={"output_dir": Path("runs/x")})
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "checkpoints").exists()


def test_keep_last_prunes_older_complete_checkpoints(tmp_path):
    model, processor = tiny_model_and_processor()
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, model, processor, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    _save(tmp_path, 8, model, processor, keep_last=2)  # a re-save of the same step replaces it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    _save(tmp_path, 10, model, processor, keep_last=0)  # 0 keeps all
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3


def test_latest_ignores_temp_and_unmarked_dirs(tmp_path):
    model, processor = tiny_model_and_processor()
    good = _save(tmp_path, 3, model, processor)
    root = tmp_path / "checkpoints"
    shutil.copytree(good, root / ".tmp-step-000009")  # a save killed before its rename
    truncated = root / "step-000005"
    shutil.copytree(good, truncated)
    (truncated / "COMPLETE").unlink()  # no marker: e.g. copied by hand and cut short
    (root / "step-notanumber").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert latest_checkpoint(tmp_path / "nowhere") is None
    _save(tmp_path, 4, model, processor)  # the next save clears nothing it should not
    assert latest_checkpoint(tmp_path).name == "step-000004" and truncated.is_dir()


def test_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, processor = tiny_model_and_processor()
    good = _save(tmp_path, 1, model, processor)

    def boom(*args, **kwargs):
        raise RuntimeError("killed while saving the processor")

    monkeypatch.setattr(processor, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="killed while saving"):
        _save(tmp_path, 2, model, processor)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # no partial, no temp

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(processor, "save_pretrained", disk_full)
    with pytest.raises(RunDirError, match=r"step-000002.*No space left.*step-000001"):
        _save(tmp_path, 2, model, processor)
    assert latest_checkpoint(tmp_path) == good
    assert load_trainer_state(good)["step"] == 1


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write: chmod 0o500, or (as root, which ignores modes) under a file."""
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    try:
        (d / "probe").write_text("x")
    except PermissionError:
        return d
    (d / "probe").unlink()  # root: permission bits do not stop it
    d.chmod(0o700)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return blocker / "run"


def test_unwritable_run_dir_gives_run_dir_error(tmp_path):
    check_writable(tmp_path / "new" / "run")  # created on the way
    assert (tmp_path / "new" / "run").is_dir() and not os.listdir(tmp_path / "new" / "run")
    bad = _unwritable_dir(tmp_path)
    try:
        with pytest.raises(RunDirError, match=f"run directory {bad} is not writable") as info:
            check_writable(bad)
        assert isinstance(info.value, OSError) and "--output-dir" in str(info.value)
        assert "\n" not in str(info.value)
        model, processor = tiny_model_and_processor()
        with pytest.raises(RunDirError, match="could not write checkpoint"):
            _save(bad, 1, model, processor)
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_peft_model_saves_merged_weights_and_its_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model, processor = tiny_model_and_processor()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero; make the adapter matter
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ckpt = _save(tmp_path, 1, lora, processor)
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    loaded, loaded_proc = load_model_and_processor(ckpt)
    _, batch = shapes_batch(loaded_proc, n=2)
    with torch.no_grad():
        want, got = lora(**batch).logits, loaded(**batch).logits
        base = tiny_model_and_processor()[0](**batch).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter changed the outputs...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # ...and the merged weights carry it


# ------------------------------------------------- sharded checkpoints (cppo.rl.sharded), one process


def test_sharded_checkpoint_round_trip_and_export(tmp_path):
    """The sharded layout written by one process (no torch.distributed): complete, listed, loaded
    back into another model and optimizer, and exported as a from_pretrained folder."""
    model, processor, opt, sched = _tiny_training_state()
    state = {"step": 3, "sampler": {"epoch": 0, "offset": 3}}
    ckpt = save_sharded_checkpoint(tmp_path, 3, model, processor, opt, sched, state)
    assert latest_checkpoint(tmp_path) == ckpt and is_sharded_checkpoint(ckpt)
    assert not list(ckpt.glob("*.safetensors")) and load_trainer_state(ckpt)["optimizer"] is None
    other, _ = tiny_model_and_processor(seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    load_shards(ckpt, other, other_opt)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), other_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert int(b["step"]) == 1
    exported, _ = load_model_and_processor(export_sharded(ckpt, tmp_path / "export"))
    _, batch = shapes_batch(processor, n=2)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, exported(**batch).logits)
    with_export = save_sharded_checkpoint(tmp_path, 4, model, processor, opt, sched, state, export=True)
    loaded, _ = load_model_and_processor(with_export)  # the gathered weights beside the shards
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_sharded_save_that_fails_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, processor, opt, sched = _tiny_training_state()
    state = {"step": 1, "sampler": {"epoch": 0, "offset": 1}}
    good = save_sharded_checkpoint(tmp_path, 1, model, processor, opt, sched, state)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(processor, "save_pretrained", disk_full)  # after the shards are written
    with pytest.raises(RunDirError, match=r"step-000002.*No space left.*step-000001 is intact"):
        save_sharded_checkpoint(tmp_path, 2, model, processor, opt, sched, {**state, "step": 2})
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # no temporary left


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_full_disk_inside_a_library_writer_is_a_write_error(tmp_path, monkeypatch, writer):
    """On a real full disk torch.save raises RuntimeError ("unexpected pos ...") and safetensors its
    own SafetensorError, not OSError: both become the one-line RunDirError, the previous kept."""
    from safetensors import SafetensorError

    import cppo.rl.checkpoint as ckpt_mod

    model, processor = tiny_model_and_processor()
    good = _save(tmp_path, 1, model, processor)
    if writer == "torch.save":
        real_save = ckpt_mod.torch.save

        def full(obj, f, *args, **kwargs):  # files only: the in-memory weights_only check still works
            if isinstance(f, (str, Path)):
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 896")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(ckpt_mod.torch, "save", full)
    else:

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: IoError(No space left on device)")

        monkeypatch.setattr(ckpt_mod, "_save_model", full)
    with pytest.raises(RunDirError, match=r"could not write checkpoint .*step-000002.*step-000001 is intact"):
        _save(tmp_path, 2, model, processor)
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


# ------------------------------------------------- content hashes in the manifest (cppo.rl.manifest)


def _flip_byte(path: Path) -> None:
    """Change one byte in the middle of a file in place, its size kept (a bad disk, a stray write)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_the_size_and_sha256_of_every_file(tmp_path):
    model, processor, opt, sched = _tiny_training_state()
    ckpt = _save(tmp_path, 1, model, processor, opt, sched)
    manifest = json.loads((ckpt / "COMPLETE").read_text())
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert "model.safetensors" in names and "trainer_state.pt" in names
    assert sorted(manifest["files"]) == names == sorted(manifest["sha256"])
    for name in names:  # what `sha256sum` prints
        assert manifest["files"][name] == (ckpt / name).stat().st_size
        assert manifest["sha256"][name] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert checkpoint_problem(ckpt) is None and checkpoint_corruption(ckpt) is None


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_a_byte_changed_in_place_is_found_by_its_hash_not_its_size(tmp_path, name):
    model, processor, opt, sched = _tiny_training_state()
    ckpt = _save(tmp_path, 1, model, processor, opt, sched)
    _flip_byte(ckpt / name)
    # The cheap check (every listing runs it) sees the same sizes; the hash, read on resume, does not.
    assert checkpoint_problem(ckpt) is None and latest_checkpoint(tmp_path) == ckpt
    assert checkpoint_corruption(ckpt) == (
        f"{name} does not match the sha256 its COMPLETE manifest records (changed after the save)"
    )


def test_a_damaged_manifest_makes_a_checkpoint_incomplete_an_old_marker_does_not(tmp_path):
    model, processor = tiny_model_and_processor()
    old, damaged = _save(tmp_path, 1, model, processor), _save(tmp_path, 2, model, processor)
    (old / "COMPLETE").write_text("step 1\n")  # the marker before manifests: nothing to verify
    assert checkpoint_problem(old) is None and checkpoint_corruption(old) is None
    for text, problem in [
        ('{"step": 2, "files": {"model.safe', "COMPLETE is not valid JSON"),  # cut short
        ("[1, 2]", "COMPLETE is not a manifest"),
        ('{"step": 2, "files": {"model.safetensors": "big"}}', "COMPLETE is not a manifest"),
        ('{"step": 2, "files": {}, "sha256": ["x"]}', "COMPLETE is not a manifest"),
        ("", "COMPLETE is not valid JSON"),
    ]:
        (damaged / "COMPLETE").write_text(text)
        assert problem in checkpoint_problem(damaged), text
        assert latest_checkpoint(tmp_path) == old, text


def test_sharded_checkpoint_hashes_every_shard(tmp_path):
    model, processor, opt, sched = _tiny_training_state()
    state = {"step": 1, "sampler": {"epoch": 0, "offset": 1}}
    ckpt = save_sharded_checkpoint(tmp_path, 1, model, processor, opt, sched, state)
    digests = json.loads((ckpt / "COMPLETE").read_text())["sha256"]
    shards = sorted((ckpt / "shards").glob("*.distcp"))
    assert shards and all(f"shards/{s.name}" in digests for s in shards) and "shards/.metadata" in digests
    assert checkpoint_corruption(ckpt) is None
    _flip_byte(shards[0])
    assert checkpoint_corruption(ckpt).startswith(f"shards/{shards[0].name} does not match the sha256")


def test_sharded_shards_or_state_that_cannot_be_written_are_a_write_error(tmp_path, monkeypatch):
    """DCP reports a rank's failed write as CheckpointException (a BaseException, every rank's
    traceback in its text) and torch.save a full disk as RuntimeError: both are the one-line
    RunDirError naming the first failure, the previous checkpoint kept."""
    from torch.distributed.checkpoint.api import CheckpointException

    import cppo.rl.sharded as sharded_mod

    model, processor, opt, sched = _tiny_training_state()
    state = {"step": 1, "sampler": {"epoch": 0, "offset": 1}}
    good = save_sharded_checkpoint(tmp_path, 1, model, processor, opt, sched, state)
    failure = (OSError(28, "No space left on device"), traceback.StackSummary())

    def shards_full(*args, **kwargs):
        raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: failure})

    with monkeypatch.context() as m:
        m.setattr(sharded_mod.dcp, "save", shards_full)
        with pytest.raises(RunDirError) as info:
            save_sharded_checkpoint(tmp_path, 2, model, processor, opt, sched, {**state, "step": 2})
    message = str(info.value)
    assert "rank 0 could not write its shards: [Errno 28] No space left on device" in message
    assert "step-000001 is intact" in message and "\n" not in message
    real_save = torch.save

    def state_full(obj, f, *args, **kwargs):  # files only: the in-memory weights_only check still works
        if isinstance(f, (str, Path)):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 896")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(sharded_mod.torch, "save", state_full)
    with pytest.raises(RunDirError, match=r"step-000002 .*unexpected pos.*step-000001 is intact"):
        save_sharded_checkpoint(tmp_path, 2, model, processor, opt, sched, {**state, "step": 2})
    assert latest_checkpoint(tmp_path) == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
