"""What a run or an evaluation runs on: the torch device a ``--device`` names, and the versions of the packages
that a report records."""
from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from .errors import UserError


def resolve_device(name: str):
    """The ``torch.device`` of a ``--device`` value (auto, cpu, cuda, cuda:N, mps), checked to be usable here."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: this torch has no usable MPS (Apple GPU) backend; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: a run needs a device that computes (cpu, cuda, cuda:N), not {dev.type}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
    return dev


def package_version(package: str) -> str | None:
    """The installed version of ``package``, None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def versions(*packages: str) -> dict[str, str | None]:
    """Python's, torch's and each package's version, as the reports record them."""
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, **{p: package_version(p) for p in packages}}


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal, where progress bars redraw in place; in a file or a pipe each redraw would
    be one more line (a carriage-return frame), so progress is written a line per stage instead."""
    import sys
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):       # replaced or closed
        return False
