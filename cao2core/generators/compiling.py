"""``torch.compile`` for generator plugins: the ``--gen-opt compile`` modes and the wrapper.

``aot_eager`` captures graphs (dynamo + AOT autograd) without generating code: what the tests use, in seconds.
``reduce-overhead`` adds CUDA graphs, which pay where many small kernels run back to back (MAR's DiffLoss head).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "aot_eager")


def compile_mode(options: dict) -> str:
    """The checked ``--gen-opt compile`` value (``none`` when unset)."""
    mode = options.get("compile") or "none"
    if mode not in COMPILE_MODES:
        raise UserError(f"--gen-opt compile={mode}: use one of {', '.join(COMPILE_MODES)}")
    return mode


def compiled(fn: Callable, mode: str) -> Callable:
    """``fn`` through ``torch.compile`` in ``mode`` (``fn`` itself for ``none``)."""
    if mode == "none":
        return fn
    return torch.compile(fn, **({"backend": "aot_eager"} if mode == "aot_eager" else {"mode": mode}))
