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


def default_autocast(device: torch.device, profile: str | None = "default", weights: str | None = None) -> str:
    """The ``--gen-opt autocast`` a generator uses when none is given: ``bf16`` on CUDA under the default profile
    with fp32 weights (the generator's forward passes; latents and CLO's Adam state stay fp32), else ``none``: the
    CPU stays fp32, ``--profile reference`` runs fp32 with TF32 as the official DiT code does, and ``--dtype
    bf16|fp16`` weights compute in their own dtype."""
    if device.type == "cuda" and (profile or "default") == "default" and (weights or "fp32") == "fp32":
        return "bf16"
    return "none"


TF32_ENV = "CAO2_TF32"      # 0 or 1: overrides the TF32 setting a CUDA run applies (on)


def apply_tf32(device: torch.device, environ=None) -> dict | None:
    """Allow TF32 in CUDA matmuls and cuDNN convolutions (as the official DiT, MAR and CaO2 scripts do), unless
    ``CAO2_TF32=0``; returns the settings now in effect, as the manifest records them (None on a CPU, where TF32
    does not exist and nothing is set). The settings are torch's process-wide flags: they stay as set after the
    run."""
    import os
    value = (os.environ if environ is None else environ).get(TF32_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise UserError(f"environment variable {TF32_ENV}={value!r}: use 1 (TF32 on, the default on CUDA) or 0 "
                        "(strict fp32 matmuls and convolutions), or unset it")
    if device.type != "cuda":
        return None
    on = value != "0"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return tf32_in_effect()


def tf32_in_effect() -> dict:
    """torch's TF32 flags as they are now."""
    return {"matmul": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn": bool(torch.backends.cudnn.allow_tf32)}


def selection_autocast(device: torch.device, profile: str | None, reference: str | None) -> torch.dtype | None:
    """The autocast the selection's decode and classifier run under: the generator's official one
    (``LatentSpec.reference_selection_autocast``) under ``--profile reference`` on CUDA; else none (fp32)."""
    if profile != "reference" or reference is None or device.type != "cuda":
        return None
    return autocast_dtype(reference)
