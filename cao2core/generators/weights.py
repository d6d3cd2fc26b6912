"""Checkpoint files for generator plugins and the classifier loader: their sha256 (cached) and their dtypes.

A run's identity holds the sha256 of every weight file it used, so a rerun hashes them again; the digest is
cached by (path, size, modification time) under the user's cache folder, so gigabytes are read once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def cache_file() -> Path:
    """``CAO2_HASH_CACHE``, else ``$XDG_CACHE_HOME/cao2/sha256.json`` (default ``~/.cache``). Refuses a path that
    is a folder: the cache is one file, and writing it would leave its temporary copy beside the folder."""
    if os.environ.get("CAO2_HASH_CACHE"):
        path = Path(os.environ["CAO2_HASH_CACHE"]).expanduser()
        if path.is_dir():
            raise UserError(f"CAO2_HASH_CACHE={os.environ['CAO2_HASH_CACHE']} is a folder; set it to a file path "
                            f"(e.g. {path / 'sha256.json'}) or unset it")
        return path
    path = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cao2" / "sha256.json"
    if path.is_dir():
        raise UserError(f"the sha256 cache {path} is a folder; move it away, or set CAO2_HASH_CACHE to a file path")
    return path


def file_sha256(path) -> str:
    """sha256 of a file, from the cache when its path, size and modification time are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache = _read_cache()
    if key in cache:
        return cache[key]
    cache[key] = stream_sha256(path)
    _write_cache(cache)
    return cache[key]


def stream_sha256(path) -> str:
    """sha256 of a file, read in blocks (uncached)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def source_sha256(source: str | None) -> str | None:
    """sha256 of a checkpoint file, or of a folder's weight files (names and contents, in name order); None for
    a source that is not on this disk (a hub id that is not cached)."""
    if source is None:
        return None
    path = Path(source)
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def load_error(exc: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` or safetensors refused a file, in a few words."""
    import pickle
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
        return ("it holds Python objects besides tensors (a pickle), which cao2 does not execute: re-save it as a "
                "plain state dict (torch.save(model.state_dict(), ...)) or as safetensors")
    text = " ".join(str(exc).split())
    return f"it is truncated or not a torch/safetensors file ({type(exc).__name__}: {text[:160]})"


def require_floating(state: dict, source, model: torch.nn.Module | None = None) -> None:
    """Refuse a state dict with a non-floating weight: ``load_state_dict`` would cast int8 or bool weights into
    the model's float parameters without a word, and the run would compute garbage. With ``model`` (the one the
    state is for), an integer tensor is accepted where that model itself holds an integer buffer: a float model
    saves those (BatchNorm's ``num_batches_tracked`` counts batches); where it holds a parameter or a float
    buffer, an integer tensor is a quantized weight and refused."""
    integer_buffers = set() if model is None else {
        name for name, buffer in model.named_buffers() if not (buffer.is_floating_point() or buffer.is_complex())}
    for name, value in state.items():
        if (isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex())
                and name not in integer_buffers):
            raise UserError(f"checkpoint {source}: weight {name!r} is {str(value.dtype).removeprefix('torch.')}, "
                            "not floating point (a quantized or damaged file); give the float checkpoint")


def require_floating_files(folder) -> None:
    """``require_floating`` for the safetensors files of a diffusers folder, from their headers (no weights read)."""
    from safetensors import safe_open
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as fh:
                for name in fh.keys():
                    dtype = fh.get_slice(name).get_dtype()
                    if not dtype.startswith(("F", "BF", "C")):
                        raise UserError(f"checkpoint {path}: weight {name!r} is {dtype}, not floating point "
                                        "(a quantized or damaged file); give the float checkpoint")
        except UserError:
            raise
        except Exception:   # unreadable: the loader that follows says why in its own words
            return


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    """Best effort: a cache that cannot be written only costs the hashing again."""
    path = cache_file()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):      # a failed write leaves nothing behind
            tmp.unlink(missing_ok=True)


def strict_problem(module: torch.nn.Module, state: dict) -> str:
    """What keeps ``state`` from loading strictly into ``module``, in a few words ("" when nothing): the first
    missing, unexpected and mis-shaped entries, for a one-line error naming the checkpoint."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" and {len(items) - 2} more" if len(items) > 2 else ""
            parts.append(f"{label} {', '.join(items[:2])}{more}")
    return "; ".join(parts)


def read_state_dict(path: Path, what: str = "") -> dict:
    """A checkpoint's state dict: safetensors, or a torch file read with ``weights_only`` (no pickle runs); a
    training checkpoint's ``ema`` entry is the weights (the EMA is what these models sample with). Anything else,
    or a non-floating weight, is one UserError naming the file; ``what`` says which files are expected."""
    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {load_error(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        state = state["ema"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors" + (f" ({what})" if what else ""))
    require_floating(state, path)
    return state
