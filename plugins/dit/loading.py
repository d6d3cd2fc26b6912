"""Load a DiT transformer and its VAE from a diffusers folder, a hub id, or an original DiT checkpoint.

Loading is strict: a missing, unexpected or mis-shaped weight is an error, never a silent re-initialisation.

Timestep-embedding frequencies: DiT was trained with cos/sin of t * exp(-ln(10^4) * i / 128), i < 128; diffusers'
``DiTTransformer2DModel`` builds exp(-ln(10^4) * i / 127) (``downscale_freq_shift=1``), 1.4% off at t = 11 and
101% at t = 999. Every published DiT checkpoint (the original ``.pt`` and the hub's diffusers-format copies of
the same weights) gets DiT's frequencies; a folder whose ``cao2.json`` says ``"timestep_freqs": "diffusers"``
(a DiT trained with diffusers' module, as the embedded MNIST world) keeps diffusers'.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.models.embeddings import Timesteps

from cao2core.generators import weights, worlds
from cao2core.errors import UserError

from . import convert

WORLDS = Path(__file__).parent / "worlds"
ORIGINAL_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"   # the VAE of DiT-XL/2 and of the reference code
# the timestep-embedding frequencies a DiT was trained with -> diffusers' Timesteps.downscale_freq_shift
TIMESTEP_FREQS = {"dit": 0, "diffusers": 1}


def set_timestep_freqs(model: DiTTransformer2DModel, freqs: str) -> None:
    """Give every timestep embedding of ``model`` the frequencies it was trained with (``TIMESTEP_FREQS``)."""
    if freqs not in TIMESTEP_FREQS:
        raise UserError(f"--gen-opt timestep_freqs={freqs}: use dit (the original DiT training code, every "
                        "published DiT checkpoint) or diffusers (a DiT trained with diffusers' module)")
    for module in model.modules():
        if isinstance(module, Timesteps):
            module.downscale_freq_shift = TIMESTEP_FREQS[freqs]


def world_dir(name: str) -> Path | None:
    d = WORLDS / name
    return d if (d / "transformer").is_dir() else None


# the cao2.json keys the dit plugin reads, and their JSON types
DEFAULT_TYPES = {"label_space": str, "sampler": str, "timestep_freqs": str, "sample_steps": int,
                 "guidance": worlds.NUMBER}
SOURCE_KEY = "_file"     # where read_defaults records the file the defaults came from, for messages naming it


def read_defaults(path: Path) -> dict:
    """A world folder's cao2.json (sampling defaults, label space): a JSON object, else one line naming the file."""
    defaults = worlds.read_world_settings(path, DEFAULT_TYPES, "remove it to use DiT's defaults")
    return {**defaults, SOURCE_KEY: str(path)}


def resolve(model: str | None, vae: str | None, dataset: str | None) -> tuple[str, str, dict]:
    """Return (transformer source, vae source, defaults from a cao2.json beside them)."""
    if model is None:
        world = world_dir(dataset or "mnist")
        if world is None:
            raise UserError(f"no embedded DiT world for dataset {dataset!r}; pass --model (a diffusers DiT "
                            "folder, a DiT-XL-2-256x256.pt checkpoint or a hub id such as facebook/DiT-XL-2-256)")
        model = str(world)
    path = Path(model)
    defaults: dict = {}
    if path.is_dir():
        if (path / "cao2.json").is_file():
            defaults = read_defaults(path / "cao2.json")
        if (path / "transformer").is_dir():            # a DiTPipeline folder (model_index.json) or a world
            return str(path / "transformer"), vae or str(path / "vae"), defaults
        if (path / "config.json").is_file():           # a transformer folder on its own
            return str(path), vae or DEFAULT_VAE, defaults
        raise UserError(f"{path} is neither a DiTPipeline folder nor a DiT transformer folder "
                        "(no transformer/ or config.json inside)")
    if path.suffix in ORIGINAL_SUFFIXES or path.exists() or model.startswith((".", "/", "~")):
        if not path.is_file():
            raise UserError(f"DiT checkpoint {model} not found; give an existing file, a diffusers folder or a hub id")
        return str(path), vae or DEFAULT_VAE, defaults
    return model, vae or model, defaults    # a hub id; its VAE lives in the same repo unless --vae says otherwise


def load_transformer(source: str, num_heads: int | None = None,
                     dtype: torch.dtype = torch.float32) -> DiTTransformer2DModel:
    """The transformer in ``dtype``: built in it rather than cast afterwards, since diffusers' ``ModelMixin.to``
    logs a warning on every dtype cast ("modules that should be kept in float32: []", even when it has none)."""
    path = Path(source)
    if path.is_file():
        state = weights.read_state_dict(path)
        if not convert.is_original_layout(state):
            raise UserError(f"{path} is not a DiT checkpoint in the original facebookresearch layout "
                            "(no x_embedder / y_embedder entries); is it the right file?")
        converted, pos_embed = convert.convert_original(state)
        model = DiTTransformer2DModel(**convert.infer_config(state, num_heads))
        expected = model.pos_embed.pos_embed
        if pos_embed.shape != expected.shape or not torch.allclose(pos_embed.float(), expected.float(), atol=1e-3):
            raise UserError(f"{path}: its pos_embed differs from the standard 2-D sin-cos embedding; "
                            "this is not a standard DiT checkpoint")
        if dtype != torch.float32:      # torch.nn.Module.to: the cast without diffusers' spurious warning
            torch.nn.Module.to(model, dtype)
        _load_strict(model, converted, path)
        return model
    try:
        model, info = _from_pretrained(DiTTransformer2DModel, source, "transformer", dtype)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot load the DiT transformer from {source} ({_cause(exc)})") from None
    _check_info(info, source)
    return model


def load_vae(source: str) -> AutoencoderKL:
    try:
        vae, info = _from_pretrained(AutoencoderKL, source, "vae")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot load the VAE from {source} ({_cause(exc)}); "
                        "pass --vae with a diffusers AutoencoderKL folder or hub id") from None
    _check_info(info, source)
    return vae


def sha256_of(source: str, component: str) -> str | None:
    """sha256 of a checkpoint file or a folder's weight files; for a hub id, of the cached file it loaded from."""
    if Path(source).exists():
        return weights.source_sha256(source)
    try:
        from huggingface_hub import try_to_load_from_cache
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            for where in (f"{component}/{name}", name):
                cached = try_to_load_from_cache(source, where)
                if isinstance(cached, str):
                    return weights.file_sha256(cached)
    except Exception:       # not a hub id the cache knows: nothing on this disk to hash
        return None
    return None


# what a hub id names and the flag giving the same model from a local folder, by component
HUB_FIXES = {"transformer": ("DiT transformer", "pass --model with a local DiT folder in the diffusers layout (a "
                             "DiTPipeline folder, or transformer/ with config.json and its weights) or an original "
                             "DiT-XL-2-256x256.pt checkpoint"),
             "vae": ("VAE", "pass --vae with a local AutoencoderKL folder (config.json and "
                            "diffusion_pytorch_model.safetensors)")}


def hub_folder(repo: str, component: str) -> Path:
    """The local folder of hub repo ``repo``'s ``component`` (its subfolder, or the repo root:
    ``stabilityai/sd-vae-ft-mse`` is a VAE on its own), from the hub cache before any network call; not cached
    and not downloadable now (offline, unreachable) is one UserError at once."""
    choices = [(f"{prefix}config.json", f"{prefix}diffusion_pytorch_model.{ext}")
               for prefix in (f"{component}/", "") for ext in ("safetensors", "bin")]
    try:
        return weights.hub_files(repo, choices)[0].parent
    except weights.HubMiss as why:
        what, fix = HUB_FIXES[component]
        raise UserError(weights.hub_miss_message(what, repo, why, fix)) from None


def _from_pretrained(cls, source: str, component: str, dtype: torch.dtype = torch.float32):
    """(model in ``dtype``, loading info) from a local component folder or a hub repo's (``hub_folder``)."""
    folder = Path(source) if Path(source).exists() else hub_folder(source, component)
    kw = dict(output_loading_info=True, low_cpu_mem_usage=False, torch_dtype=dtype)
    with _quiet_diffusers():        # its multi-line logs of a failed attempt would bury the one-line error
        if not any(folder.glob("diffusion_pytorch_model*")):
            raise UserError(f"{source} has no diffusion_pytorch_model.safetensors (nor .bin): the weights of "
                            "this diffusers folder are missing; copy them in or point to the complete folder")
        weights.require_floating_files(folder)
        return cls.from_pretrained(str(folder), **kw)   # a str: the config records it for the manifest


@contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _load_strict(model: torch.nn.Module, state: dict, source) -> None:
    try:
        weights.load_into(model, state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"checkpoint {source} does not fit the DiT architecture it describes: {detail}") from None


def _check_info(info: dict, source: str) -> None:
    problems = [f"{k}: {', '.join(map(str, v[:3]))}" for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if (v := list(info.get(k) or []))]
    if problems:
        raise UserError(f"checkpoint {source} does not match its config ({'; '.join(problems)})")


def _cause(exc: Exception) -> str:
    """The essential cause of a loading error, on one line (torch's state-dict errors name the key on line 2)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Error(s) in loading state_dict", "You may consider"))]
    return f"{type(exc).__name__}: {'; '.join(lines[:2])}"[:300]
