"""Devices and precision: one rule for every command, and the autocast region of the trainer.

`resolve_device("auto")` is CUDA when present, else the CPU. `resolve_dtype("auto", device)` is the
COMPUTE precision: bfloat16 on CUDA, float32 on the CPU (bf16 matmuls gain nothing on most CPUs).

The trainer keeps its trainable parameters, their gradients and the optimizer state in float32
(the master weights) whatever the compute precision, and runs the forwards in bf16 through
`autocast` (without FSDP) or FSDP2's `MixedPrecisionPolicy` plus `autocast` (cppo.rl.fsdp), as
verl and EasyR1 do. bf16 parameters updated in place would lose every update smaller than about
|w|/256 (8 mantissa bits): at lr 1e-6 about 99 % of a model's weights would never move. A frozen
model (the reference, the detector's) has no updates, so it is held in the compute dtype.
"""

from __future__ import annotations

import contextlib

import torch

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto": CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """ "auto" (or None): bfloat16 on CUDA, float32 elsewhere; else the named dtype.

    Raises ValueError naming the valid spellings for an unknown name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def autocast(device: torch.device | str, dtype: torch.dtype):
    """The region in which forwards compute in `dtype` while parameters keep their own dtype.

    float32 (or a dtype autocast does not take on this device) gives a no-op context, so callers
    never branch on precision."""
    device_type = torch.device(device).type
    if dtype == torch.float32 or not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device_type` right now, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def check_device(name: str, command: str) -> torch.device:
    """The device `name` (a ``--device`` value) names, usable in this process; ValueError, one
    line naming the flag and what to use, otherwise (a name torch does not know, a device type
    other than cpu/cuda, CUDA where this torch sees none, a CUDA index past the visible devices).
    ``command`` names the CLI in the message."""
    try:
        device = resolve_device(name)
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise ValueError(
            f"--device {name!r} is not a device torch knows ({reason}); use auto, cpu or cuda"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: {command} runs on cpu or cuda")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this torch sees no CUDA device; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this process sees {count} CUDA device(s), 0..{count - 1}")
    return device
