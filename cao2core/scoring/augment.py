"""Training-time augmentation on batches, every draw from an explicit CPU generator.

Order per batch: 2x2 patch shuffle (rded-faithful only) -> random-resized crop + horizontal flip -> CutMix.
Draws are made on the CPU and moved to the device, so a seed gives the same augmentations on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    crop_min: float = 0.5        # random-resized crop: area fraction drawn from U(crop_min, 1)
    flip: bool = True            # horizontal flip with probability 1/2
    cutmix: bool = False         # CutMix with lambda ~ Beta(1, 1) = U(0, 1), partner from a permutation
    patch_shuffle: bool = False  # RDED's ShufflePatches at factor 2: swap the two halves along H, then W, each p=1/2


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def patch_shuffle(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per image, swap the top and bottom halves with p=1/2, then the left and right halves with p=1/2."""
    out = x.clone()
    for dim in (2, 3):
        swap = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
        if swap.any():
            half = x.shape[dim] // 2
            rolled = torch.roll(out[swap], shifts=half, dims=dim)
            out[swap] = rolled
    return out


def resized_crop_flip(x: torch.Tensor, spec: AugmentSpec, g: torch.Generator) -> torch.Tensor:
    """Random-resized crop (area U(crop_min, 1), aspect ratio log-uniform in [3/4, 4/3]) and flip, to the same size."""
    n = x.shape[0]
    area = _uniform(n, spec.crop_min, 1.0, g)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), g)
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)    # half-extent in normalised [-1, 1] coordinates
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=g) - 1) * (1 - w)
    cy = (2 * torch.rand(n, generator=g) - 1) * (1 - h)
    sign = torch.ones(n)
    if spec.flip:
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutmix(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste a box of a partner image into each image; returns (images, partner index, area share kept)."""
    n, _, H, W = x.shape
    perm = torch.randperm(n, generator=g)
    lam = float(torch.rand((), generator=g))
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = int(torch.randint(H, (), generator=g)), int(torch.randint(W, (), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm.to(x.device), :, y0:y1, x0:x1]
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    return out, perm, kept


def augment(x: torch.Tensor, spec: AugmentSpec, g: torch.Generator):
    """Images in [0, 1] -> (augmented images, mix) where mix is (partner index, area share kept) or None."""
    if spec.patch_shuffle:
        x = patch_shuffle(x, g)
    x = resized_crop_flip(x, spec, g)
    if spec.cutmix and x.shape[0] > 1:
        x, perm, kept = cutmix(x, g)
        return x, (perm, kept)
    return x, None
