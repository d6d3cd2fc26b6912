"""Per-work-unit random generators: every draw of unit (class, index) depends only on (run seed, class, index, stream).

So results do not depend on batch size, class sharding or where a run was resumed.
"""
from __future__ import annotations

import hashlib

import torch

STREAMS = ("sample", "encode", "clo-noise", "clo-level", "select")


def unit_seed(run_seed: int, label: int, index: int, stream: str) -> int:
    """A 63-bit seed for one unit and one purpose (stream), stable across versions and platforms."""
    key = f"cao2/{run_seed}/{label}/{index}/{stream}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def unit_generator(run_seed: int, label: int, index: int, stream: str) -> torch.Generator:
    """A CPU generator for the unit; draw on CPU and move to the device, so results match across devices."""
    return torch.Generator("cpu").manual_seed(unit_seed(run_seed, label, index, stream))


def unit_generators(run_seed: int, label: int, indices, stream: str) -> list[torch.Generator]:
    return [unit_generator(run_seed, label, int(i), stream) for i in indices]


def randn(generators: list[torch.Generator], shape: tuple[int, ...], device=None) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked, drawn on CPU."""
    out = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return out.to(device) if device is not None else out
