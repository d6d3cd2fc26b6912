"""Checkpoint files for generator plugins and the classifier loader: their sha256 (cached), their dtypes, reading
them with one copy in memory, and finding hub models in the local Hugging Face cache before asking the network.

A run's identity holds the sha256 of every weight file it used, so a rerun hashes them again; the digest is
cached by (path, size, modification time) under the user's cache folder, so gigabytes are read once.

Torch checkpoints are memory-mapped (``torch.load(mmap=True)``) and their tensors become the model's parameters
(``load_into``: ``load_state_dict(assign=True)``), so a process holds one copy of the weights instead of the
loaded file plus the model; on a GPU the copy to the device releases the mapping. On a CPU the parameters stay
mapped from the file (private, copy-on-write): replacing the file (a new file renamed over it, or deleted) leaves
the loaded model as it was, but rewriting it in place while a run is going changes or breaks the mapped weights.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import UserError, reason

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# seconds the hub gets to answer whether a repo exists before it counts as unreachable: huggingface_hub's own
# defaults (10 s per request, retried) add up to a minute of silence when the network is down
HUB_PROBE_TIMEOUT_S = 4.0


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
            state = torch_load(path)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {load_error(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("ema"), dict):
        state = state["ema"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors" + (f" ({what})" if what else ""))
    require_floating(state, path)
    return state


def torch_load(path, safe_globals: Sequence = ()):
    """``torch.load`` with ``weights_only`` (no pickle code runs) and ``mmap``: the tensors stay in the file's pages
    until used, so loading does not hold a second copy of a large checkpoint. A file in torch's legacy (pre-1.6,
    non-zip) format cannot be mapped and is read whole."""
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def load_into(module: torch.nn.Module, state: dict) -> None:
    """``module.load_state_dict(state, strict=True)`` with the state's tensors becoming the parameters
    (``assign=True``) instead of being copied into them, so a memory-mapped checkpoint is not held twice. A
    floating tensor is first cast to the dtype of the entry it replaces, as the copying load would (assign alone
    would give an fp16 file's model fp16 parameters); raises what ``load_state_dict`` raises."""
    own = module.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() and own[k].is_floating_point()
             and v.dtype != own[k].dtype else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)


class HubMiss(Exception):
    """A hub model that is neither in the local cache nor obtainable now; ``str`` says why, in a few words."""


def hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def hub_files(repo: str, choices: Sequence[Sequence[str]]) -> list[Path]:
    """Local paths of one choice of files of hub model ``repo`` (the first choice whose files are all there):
    from the hub cache when it holds them, with no network call; else, when the hub answers a metadata request
    within ``HUB_PROBE_TIMEOUT_S``, downloaded into the cache. ``HubMiss`` when neither (offline, unreachable,
    unknown repo, none of the choices in it)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    cache = hub_cache_dir()
    _require_repo_id(repo)
    for files in choices:
        found = [try_to_load_from_cache(repo, f, cache_dir=cache) for f in files]
        if all(isinstance(p, str) for p in found):
            return [Path(p) for p in found]
    listed = hub_listing(repo)
    for files in choices:
        if all(f in listed for f in files):
            try:
                return [Path(hf_hub_download(repo, f, cache_dir=cache)) for f in files]
            except Exception as exc:    # the connection dropped mid-way, the disk is full, ...
                raise HubMiss(f"downloading {files[-1]} failed ({type(exc).__name__}: {reason(exc)[:240]})") from None
    raise HubMiss(f"the hub repo has none of {' / '.join(' + '.join(files) for files in choices)}")


def hub_snapshot(repo: str, patterns: Sequence[str], complete: Callable[[Path], bool]) -> Path:
    """The local snapshot folder of hub model ``repo`` with the files matching ``patterns``: the cached snapshot
    when ``complete`` says it holds what loading needs (no network call), else downloaded after the hub answered
    a metadata request within ``HUB_PROBE_TIMEOUT_S``; ``HubMiss`` when neither."""
    from huggingface_hub import snapshot_download
    cache = hub_cache_dir()
    _require_repo_id(repo)
    try:
        local = Path(snapshot_download(repo, allow_patterns=list(patterns), cache_dir=cache, local_files_only=True))
        if complete(local):
            return local
    except Exception:       # not cached (huggingface_hub's LocalEntryNotFoundError and kin)
        pass
    hub_listing(repo)
    try:
        return Path(snapshot_download(repo, allow_patterns=list(patterns), cache_dir=cache))
    except Exception as exc:
        raise HubMiss(f"downloading it failed ({type(exc).__name__}: {reason(exc)[:240]})") from None


def hub_listing(repo: str) -> set[str]:
    """The files of hub model ``repo``, asked with a short timeout; ``HubMiss`` saying why there is no answer."""
    if hub_offline():
        raise HubMiss("HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    try:
        info = HfApi().model_info(repo, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise HubMiss("the hub has no such model, or it is private or gated (log in with `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise HubMiss(f"the hub refused the request ({reason(exc)[:120]})") from None
    except Exception as exc:        # DNS, refused connection, timeout: the transport's own error types
        raise HubMiss(f"the hub is unreachable within {HUB_PROBE_TIMEOUT_S:g} s ({type(exc).__name__}: "
                      f"{reason(exc)[:120]})") from None
    return {s.rfilename for s in info.siblings or []}


def hub_miss_message(what: str, repo: str, why: HubMiss, fix: str) -> str:
    """The one line for a hub model that could not be had: which, that it is not cached, why, and the fix."""
    return (f"{what} {repo} is not in the Hugging Face cache ({hub_cache_dir()}) and cannot be downloaded now: "
            f"{why}; {fix}")


def matches_any(folder: Path, patterns: Sequence[str]) -> bool:
    """Whether some file under ``folder`` (its path relative to it) matches one of the glob ``patterns``."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return any(fnmatch.fnmatch(n, pat) for pat in patterns for n in names)


def _require_repo_id(repo: str) -> None:
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo)
    except Exception:
        raise HubMiss("it is neither a local path nor a hub model id (owner/name)") from None
