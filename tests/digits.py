"""Real MNIST digits written as class folders of PNGs, for the tests that need images on disk."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from cao2core.data import mnist


def write_digits(root: Path, per_class: dict[str, int], first: int = 0, size: int = 32) -> Path:
    """Real MNIST test digits as PNGs, ``per_class`` = {folder name: count}; folder names are digits here."""
    x, y = mnist.load_split("test")
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(x[y == int(name)][first:first + n, 0]):
            arr = ((img + 1) * 127.5).round().to(torch.uint8).numpy()
            Image.fromarray(arr, "L").resize((size, size)).save(root / name / f"{i}.png")
    return root


def write_val(root: Path, classes=range(10), per_class: int = 5) -> Path:
    x, y = mnist.load_split("val")
    for d in classes:
        (root / str(d)).mkdir(parents=True)
        for i, img in enumerate(x[y == d][:per_class, 0]):
            Image.fromarray(((img + 1) * 127.5).round().to(torch.uint8).numpy(), "L").save(root / str(d) / f"{i}.png")
    return root
