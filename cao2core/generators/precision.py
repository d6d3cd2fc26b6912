"""Mixed precision for generator plugins: the ``--gen-opt autocast`` values and the autocast region."""
from __future__ import annotations

import contextlib

import torch

from ..errors import UserError

AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}     # --dtype: the weights' dtype


def weights_dtype(name: str | None) -> torch.dtype:
    """The dtype of ``--dtype NAME`` (None: fp32)."""
    dtype = DTYPES.get(name or "fp32")
    if dtype is None:
        raise UserError(f"unknown --dtype {name!r}; use one of {', '.join(DTYPES)}")
    return dtype


def autocast_dtype(name: str) -> torch.dtype | None:
    """The dtype of ``--gen-opt autocast=NAME`` (None: no autocast)."""
    if name not in AUTOCAST:
        raise UserError(f"--gen-opt autocast={name}: use fp16, bf16 or none")
    return AUTOCAST[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The mixed-precision region; ``None`` adds none (and leaves a caller's own autocast alone)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"``, as manifests record it."""
    return str(dtype).removeprefix("torch.") if dtype is not None else None
