"""Timestep respacing as improved-diffusion, DiT and MAR define it, for generator plugins.

``space_timesteps(1000, "50")`` in those codebases keeps the original timesteps at a *running sum* of the
stride (total - 1) / (count - 1), each rounded: 0, 20, 41, 61, 82, ..., 999 for 50 of 1000. Rounding
``i * stride`` instead differs for 278 of the counts 1..1000 (first at 21), so the sum is kept as it is.
"""
from __future__ import annotations


def space_timesteps(total: int, count: int) -> list[int]:
    """The ``count`` original timesteps of a ``total``-step schedule that a respaced sampler keeps, ascending."""
    if not 1 <= count <= total:
        raise ValueError(f"cannot keep {count} of {total} diffusion steps")
    stride = 1.0 if count == 1 else (total - 1) / (count - 1)
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return sorted(set(kept))
