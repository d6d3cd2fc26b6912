"""Finding or building the native kernels (torch.ops.cao2.*).

Order: a library built by ``CAO2_BUILD_EXT=1 pip install -e . --no-build-isolation`` (``_C*.so`` /
``_C_cuda*.so`` next to this file), else a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load``
(ninja) into the cache directory (``CAO2_KERNELS_CACHE``, default ``~/.cache/cao2/kernels/<python-torch tag>``).
A failure is remembered for the life of the process (no rebuild attempt per call).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_LOCK = threading.RLock()
_STATE: dict[str, object] = {}   # "cpu"/"cuda" -> True or the exception that made it unavailable


def source_dir() -> Path:
    """csrc/ of the source tree (CAO2_KERNELS_SRC overrides)."""
    env = os.environ.get("CAO2_KERNELS_SRC")
    return Path(env) if env else _HERE.parents[1] / "csrc"


def cache_dir() -> Path:
    env = os.environ.get("CAO2_KERNELS_CACHE")
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cao2" / "kernels"
    cu = torch.version.cuda or "cpu"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}-cu{cu}"
    return root / tag


CPU_SOURCES = ("clo_cpu.cpp",)
CUDA_SOURCES = ("clo_cuda.cpp", "clo_cuda_kernels.cu")
CFLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
CUDA_CFLAGS = ["-O3", "-fmad=false", "--expt-relaxed-constexpr"]


def _ops_registered(name: str) -> bool:
    try:
        getattr(torch.ops.cao2, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _prebuilt(stem: str) -> Path | None:
    hits = sorted(_HERE.glob(f"{stem}.*.so")) + sorted(_HERE.glob(f"{stem}.so")) + sorted(_HERE.glob(f"{stem}.*.pyd"))
    return hits[0] if hits else None


def _verbose() -> bool:
    return os.environ.get("CAO2_KERNELS_VERBOSE", "") not in ("", "0")


def _jit(name: str, sources: tuple[str, ...], cuda: bool) -> None:
    cpp_extension = _cpp_extension()

    src = source_dir()
    paths = [str(src / s) for s in sources]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise RuntimeError(f"kernel sources not found: {missing} (set CAO2_KERNELS_SRC to the csrc/ folder)")
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    kwargs = dict(name=name, sources=paths, extra_cflags=list(CFLAGS), extra_include_paths=[str(src)],
                  build_directory=str(build), is_python_module=False, verbose=_verbose())
    if cuda:
        kwargs["extra_cuda_cflags"] = list(CUDA_CFLAGS)
    cpp_extension.load(**kwargs)  # loads the library into torch.ops


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its CUDA_HOME guess warning (CPU builds need no CUDA)."""
    import logging
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _load_once(kind: str, what: str, build) -> None:
    """Run ``build`` once per process; a failure is remembered and raised again without rebuilding."""
    with _LOCK:
        st = _STATE.get(kind)
        if st is True:
            return
        if isinstance(st, BaseException):
            raise st
        try:
            build()
            _STATE[kind] = True
        except Exception as exc:  # noqa: BLE001 (remember any build/load failure)
            err = RuntimeError(f"cao2 {what} kernels unavailable: {type(exc).__name__}: {exc}")
            _STATE[kind] = err
            raise err from exc


def load_cpu() -> None:
    """Make torch.ops.cao2.{clo_fwd,clo_bwd,adam_step} available with CPU kernels, or raise."""
    def build():
        if not _ops_registered("clo_fwd"):
            lib = _prebuilt("_C")
            if lib is not None:
                torch.ops.load_library(str(lib))
            else:
                _jit("cao2_kernels_cpu", CPU_SOURCES, cuda=False)
    _load_once("cpu", "C++", build)


def load_cuda() -> None:
    """Also register the CUDA kernels (needs the CPU library, which defines the ops), or raise."""
    def build():
        load_cpu()
        lib = _prebuilt("_C_cuda")
        if lib is not None:
            torch.ops.load_library(str(lib))
            return
        cpp_extension = _cpp_extension()
        if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
            raise RuntimeError(f"no CUDA toolkit for this torch (torch.version.cuda={torch.version.cuda}, "
                               f"CUDA_HOME={cpp_extension.CUDA_HOME}); set CUDA_HOME to the toolkit root")
        _jit("cao2_kernels_cuda", CUDA_SOURCES, cuda=True)
    _load_once("cuda", "CUDA", build)


def status(kind: str) -> object:
    """True, the remembered failure, or None when not tried yet."""
    return _STATE.get(kind)
