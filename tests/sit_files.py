"""Tiny SiT and REPA checkpoint files in the original layouts (random weights, ``sit_original``) and a tiny VAE."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

import sit_original as so
from conftest import TINY_VAE

HEADS = 2
# a 10-class model on 8x8x4 latents (the tiny VAE's 32 px), 2 blocks of width 32
KINDS = {
    "sit": dict(learn_sigma=True),                                       # as SiT-XL-2-256.pt
    "repa": dict(learn_sigma=False, projector_dims=(8,)),                # as REPA's last.pt
    "repa-qk": dict(learn_sigma=False, projector_dims=(8, 12), qk_norm=True),
}


def write_checkpoint(root: Path, kind: str = "sit", seed: int = 0) -> tuple[dict, Path]:
    """(state dict, path of the .pt holding it)."""
    state = so.random_state(seed=seed, heads=HEADS, **KINDS[kind])
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{kind}-{seed}.pt"
    torch.save(state, path)
    return state, path


def write_vae(root: Path) -> Path:
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    return root / "vae"


def options(checkpoint: Path, vae: Path, **extra) -> dict:
    """``cao2_load`` options for a tiny file (the host's generic keys, unset)."""
    from cao2core.generators.hookspecs import GENERIC_OPTIONS
    return {**dict.fromkeys(GENERIC_OPTIONS), "model": str(checkpoint), "vae": str(vae), "num_heads": HEADS, **extra}
