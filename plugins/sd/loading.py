"""Load a Stable Diffusion 1.x/2.x pipeline in the diffusers layout: UNet, CLIP text encoder and tokenizer, VAE,
scheduler config.

The source is a folder written by ``StableDiffusionPipeline.save_pretrained`` (``model_index.json``, ``unet/``,
``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``) or a hub id, whose files are fetched into (or found in)
the local hub cache first, so both are loaded the same way. Loading is strict: a missing, unexpected or mis-shaped
weight is a one-line error, never a silent re-initialisation. Weights are read from safetensors only (no pickle) and
must be floating point. Each component keeps the dtype its files store (an fp16 export stays fp16) and the scheduler
is the class and config the checkpoint ships.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cao2core.generators import weights
from cao2core.errors import UserError, reason

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# model_index.json entry -> the classes cao2 loads it with (SD 1.x/2.x text-to-image pipelines)
EXPECTED = {"unet": ("UNet2DConditionModel",), "text_encoder": ("CLIPTextModel",),
            "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "vae": ("AutoencoderKL",)}
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
SAFETENSOR_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class Component:
    """A loaded component: the module, the folder it came from, the weight files read and their stored dtype."""

    module: object
    folder: Path
    files: list[Path]
    stored_dtype: torch.dtype | None = None

    def record(self) -> dict:
        """What the manifest says about it: the source, the sha256 of the weights read and of its config."""
        out = {"source": str(self.folder), "sha256": files_sha256(self.files)}
        if self.stored_dtype is not None:
            out["stored_dtype"] = str(self.stored_dtype).removeprefix("torch.")
        configs = sorted(p for p in self.folder.iterdir() if p.suffix == ".json" and p.is_file()
                         and p not in self.files)
        if configs and self.stored_dtype is not None:     # a tokenizer's files are all config: hashed above
            out["config_files"] = {"sha256": files_sha256(configs)}
        return out


def files_sha256(files: list[Path]) -> str:
    """One digest over several files: the sha256 of each, by name (a single file: its own sha256)."""
    if len(files) == 1:
        return weights.file_sha256(files[0])
    listing = json.dumps({f.name: weights.file_sha256(f) for f in files}, sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()


PIPELINE_PARTS = (("unet/", "unet"), ("vae/", "vae"), ("text_encoder/", "text_encoder"))


def hub_patterns(variant: str | None, parts=PIPELINE_PARTS) -> list[str]:
    """The weight files of a hub repo that loading reads, ``(folder prefix, component)`` each: the ``variant``'s, in
    safetensors only (a single file, or an index and its shards)."""
    suffix = f".{variant}" if variant else ""
    patterns = []
    for prefix, component in parts:
        stem = prefix + WEIGHT_STEMS[component]
        patterns += [f"{stem}{suffix}.safetensors", f"{stem}.safetensors.index{suffix}.json",
                     f"{stem}-*-of-*{suffix}.safetensors"]
    return patterns


def resolve(model: str | None, variant: str | None = None) -> Path:
    """The local pipeline folder of ``--model`` (a folder, or a hub id fetched into the hub cache)."""
    model = model or DEFAULT_MODEL
    path = Path(model).expanduser()
    if not path.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise UserError(f"--model {model}: no such folder; give a Stable Diffusion folder in the diffusers layout "
                            "(model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/) or a hub id")
        path = _from_hub(model, ["model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json",
                                 *hub_patterns(variant)], [["model_index.json"], *_part_patterns(variant)],
                         "Stable Diffusion pipeline", "--model")
    if not (path / "model_index.json").is_file():
        raise UserError(f"--model {model}: {path} has no model_index.json; give a folder written by "
                        "StableDiffusionPipeline.save_pretrained (or a hub id of one)")
    return path


def resolve_vae(vae: str | None, pipeline: Path, variant: str | None = None) -> Path:
    """The VAE folder: ``--vae`` (a folder or hub id holding an AutoencoderKL, at its root or in vae/) or the
    pipeline's own."""
    if vae is None:
        return pipeline / "vae"
    path = Path(vae).expanduser()
    if not path.exists():
        if vae.startswith((".", "/", "~")) or vae.count("/") != 1:
            raise UserError(f"--vae {vae}: no such folder; give an AutoencoderKL folder or a hub id")
        parts = (("", "vae"), ("vae/", "vae"))
        path = _from_hub(vae, ["config.json", "vae/config.json", *hub_patterns(variant, parts)],
                         [["config.json", "vae/config.json", *hub_patterns(variant, parts)]], "VAE", "--vae")
    return path / "vae" if (path / "vae" / "config.json").is_file() else path


def _part_patterns(variant: str | None) -> list[list[str]]:
    """The weight patterns of each pipeline part: a cached snapshot is complete when each has a match."""
    patterns = hub_patterns(variant)
    return [patterns[i:i + 3] for i in range(0, len(patterns), 3)]


def _from_hub(repo: str, patterns: list[str], needed: list[list[str]], what: str, flag: str) -> Path:
    """The hub repo's snapshot folder: the cached one when it has a file for each group of ``needed`` patterns
    (no network call), else downloaded; not cached and not downloadable now is one UserError at once."""
    try:
        return weights.hub_snapshot(repo, patterns, lambda folder: all(weights.matches_any(folder, group)
                                                                       for group in needed) and shards_present(folder))
    except weights.HubMiss as why:      # offline, unreachable, unknown or gated repo: all the user's to fix
        raise UserError(weights.hub_miss_message(what, repo, why, f"download it and pass the local folder with {flag}"
                                                 )) from None


def shards_present(folder: Path) -> bool:
    """Every shard that a cached sharded part's index names is there: an interrupted download of a sharded model
    leaves the index and some shards, which loading would find only at the missing one."""
    for index in folder.rglob("*.safetensors.index*.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False        # a damaged index: downloaded again
        if not all((index.parent / shard).is_file() for shard in shards):
            return False
    return True


def check_index(folder: Path) -> dict:
    """``model_index.json``, refused unless it is an SD 1.x/2.x text-to-image pipeline."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / 'model_index.json'} is not readable JSON ({exc})") from None
    for name, classes in EXPECTED.items():
        entry = index.get(name)
        found = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if found not in classes:
            raise UserError(f"{folder}: model_index.json names {name} = {found!r}, but cao2's sd generator loads "
                            f"Stable Diffusion 1.x/2.x ({name} = {' or '.join(classes)})")
    return index


def weight_files(folder: Path, component: str, variant: str | None) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads for ``component`` (one file, or the shards of an index)."""
    suffix = f".{variant}" if variant else ""
    stem = WEIGHT_STEMS[component] + suffix
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{WEIGHT_STEMS[component]}.safetensors.index{suffix}.json"
    if index.is_file():       # sharded: the index names the shards
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            raise UserError(f"{index} is not a weight index (no weight_map); re-save the {component}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UserError(f"{folder} lacks the shard {missing[0]} that {index.name} names; copy it in")
        return [index] + [folder / s for s in shards]
    pickled = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    hint = (f" (it has {pickled[0]}: cao2 does not read pickled weights; re-save the pipeline with "
            "save_pretrained(..., safe_serialization=True))" if pickled else "")
    raise UserError(f"{folder} has no {stem}.safetensors{hint}; give the complete {component} folder"
                    + (f" or another --gen-opt variant than {variant}" if variant else ""))


def stored_dtype(files: list[Path]) -> torch.dtype:
    """The floating dtype most of the weights are stored in (from the safetensors headers; no weights read)."""
    from safetensors import safe_open
    counts: dict[str, int] = {}
    for path in files:
        if path.suffix != ".safetensors":
            continue
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                kind = fh.get_slice(name).get_dtype()
                counts[kind] = counts.get(kind, 0) + 1
    floating = {k: n for k, n in counts.items() if k in SAFETENSOR_DTYPES}
    return SAFETENSOR_DTYPES[max(floating, key=floating.get)] if floating else torch.float32


def load_diffusers(cls, folder: Path, component: str, variant: str | None) -> Component:
    """A diffusers model (UNet or VAE) from its folder, strictly, in the dtype its files store."""
    files = weight_files(folder, component, variant)
    weights.require_floating_files(folder)
    dtype = stored_dtype(files)
    try:
        with quiet():
            model, info = cls.from_pretrained(folder, torch_dtype=dtype, variant=variant, use_safetensors=True,
                                              output_loading_info=True, low_cpu_mem_usage=False,
                                              ignore_mismatched_sizes=True)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot load the {component} from {folder} ({type(exc).__name__}: "
                        f"{reason(exc)[:240]})") from None
    _strict(info, folder, component)
    return Component(model, folder, files, dtype)


def load_text_encoder(folder: Path, variant: str | None) -> Component:
    """The CLIP text encoder from ``text_encoder/``, strictly, in the dtype its files store."""
    from transformers import CLIPTextModel
    files = weight_files(folder, "text_encoder", variant)
    weights.require_floating_files(folder)
    dtype = stored_dtype(files)
    try:
        with quiet():
            model, info = CLIPTextModel.from_pretrained(folder, variant=variant, use_safetensors=True,
                                                        output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:
        raise UserError(f"cannot load the text_encoder from {folder} ({type(exc).__name__}: "
                        f"{reason(exc)[:240]})") from None
    _strict(info, folder, "text_encoder")
    # transformers may load in another dtype than the files'; the cast back is exact (values came from that dtype)
    return Component(model.to(dtype), folder, files, dtype)


def load_tokenizer(folder: Path, class_name: str) -> Component:
    import transformers
    try:
        with quiet():
            tokenizer = getattr(transformers, class_name).from_pretrained(folder)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer from {folder} ({type(exc).__name__}: {reason(exc)[:240]})"
                        ) from None
    return Component(tokenizer, folder, sorted(p for p in folder.iterdir() if p.is_file()))


def load_scheduler_config(folder: Path) -> tuple[type, dict, Path]:
    """(scheduler class, config, config file) as ``scheduler/scheduler_config.json`` ships them; the config as
    written (the class fills its defaults when it is built)."""
    import diffusers
    path = folder / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is missing or not JSON ({exc}); the pipeline folder is incomplete") from None
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) and hasattr(cls, "add_noise")):
        raise UserError(f"{path} names scheduler {name!r}, which is not a diffusers noise scheduler")
    return cls, config, path


def _strict(info: dict, folder: Path, component: str) -> None:
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get(key) or []))
        if found:
            problems.append(f"{key.replace('_', ' ')}: {', '.join(found[:3])}" + (" ..." if len(found) > 3 else ""))
    if problems:
        raise UserError(f"{component} weights in {folder} do not match its config.json ({'; '.join(problems)}); "
                        "the checkpoint is damaged or belongs to another architecture")


@contextmanager
def quiet():
    """Silence the libraries' multi-line loading logs and progress bars: cao2 reports problems in one line."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    dlog.set_verbosity(dlog.CRITICAL)
    tlog.set_verbosity(tlog.CRITICAL)
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars:
            tlog.enable_progress_bar()

