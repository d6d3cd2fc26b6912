"""Mask ratios and schedules: MAR's training/CLO mask ratio and the cosine sampling schedule."""
from __future__ import annotations

import math

import torch


def truncated_normal_ratio(u: float, lo: float = 0.7, hi: float = 1.0, mean: float = 1.0, std: float = 0.25) -> float:
    """Inverse CDF of N(mean, std) truncated to [lo, hi] at the uniform draw ``u`` in [0, 1)."""
    ndtr = lambda x: float(torch.special.ndtr(torch.tensor(x, dtype=torch.float64)))  # noqa: E731
    a, b = ndtr((lo - mean) / std), ndtr((hi - mean) / std)
    p = torch.tensor(a + u * (b - a), dtype=torch.float64)
    return min(hi, max(lo, mean + std * float(torch.special.ndtri(p))))


def num_masked(seq_len: int, ratio: float) -> int:
    return min(seq_len, max(0, math.ceil(seq_len * ratio - 1e-9)))


def random_orders(generators: list, seq_len: int) -> torch.Tensor:
    """(B, L) one uniform random permutation per sample, each from its own generator (on CPU)."""
    return torch.stack([torch.randperm(seq_len, generator=g) for g in generators])


def mask_from_orders(orders: torch.Tensor, count: int) -> torch.Tensor:
    """(B, L) bool, True at the first ``count`` positions of each order (masks always cover a prefix)."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :count], True) if count else mask


def masked_after_steps(seq_len: int, steps: int) -> list[int]:
    """Tokens still masked after each of the K sampling steps (cosine schedule; the last entry is 0).

    Step k leaves floor(L * cos(pi/2 * (k+1)/K)) masked, clamped to [1, masked before the step - 1]; the last step
    predicts everything left.
    """
    out, masked = [], seq_len
    for k in range(steps):
        if k == steps - 1:
            left = 0
        else:
            left = max(1, min(masked - 1, math.floor(seq_len * math.cos(math.pi / 2 * (k + 1) / steps))))
        out.append(left)
        masked = left
    return out


def guidance_at(scale: float, schedule: str, seq_len: int, masked_after: int) -> float:
    """CFG scale of a step: ``linear`` grows with the revealed fraction, 1 + (s-1) (L - max(1, left)) / L."""
    if schedule == "constant":
        return scale
    return 1 + (scale - 1) * (seq_len - max(1, masked_after)) / seq_len
