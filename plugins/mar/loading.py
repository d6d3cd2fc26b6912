"""Load a MAR and its KL VAE: the embedded world (safetensors + cao2.json) or the published checkpoints.

Published layouts: ``checkpoint-last.pth`` is a ``torch.save`` dict with ``model``, ``model_ema`` and an ``args``
``argparse.Namespace``; the EMA weights are the ones sampled with. ``kl16.ckpt`` holds the VAE under ``model``.
Both are read with ``weights_only=True`` admitting only ``argparse.Namespace``. Loading is strict: any missing,
unexpected or mis-shaped key is a one-line ``UserError`` naming the mismatch, except entries of a VAE file
outside the VAE, which are named and skipped as MAR's own loader skips them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from cao2core.generators import weights, worlds
from cao2core.errors import UserError

from .model import MAR, PRESETS, MARConfig
from .vae import KL16, MNIST_SMALL, AutoencoderKL, KLVAEConfig

WORLDS = Path(__file__).parent / "worlds"
VAE_PRESETS = {"kl16": KL16, "mnist_small": MNIST_SMALL}


def world_dir(name: str) -> Path | None:
    d = WORLDS / name
    return d if (d / "mar.safetensors").is_file() else None


# the cao2.json keys the mar plugin reads, and their JSON types
DEFAULT_TYPES = {"label_space": str, "mar": worlds.OBJECT_OR_NAME, "vae": worlds.OBJECT_OR_NAME,
                 "guidance": worlds.NUMBER, "cfg_schedule": str, "sample_steps": int, "diffloss_steps": int,
                 "temperature": worlds.NUMBER, "clip_x0": worlds.NUMBER}


def read_defaults(folder: Path) -> dict:
    """A world folder's cao2.json (configs and sampling defaults); none: the presets given as --gen-opt decide."""
    path = folder / "cao2.json"
    if not path.is_file():
        return {}
    return worlds.read_world_settings(path, DEFAULT_TYPES, "remove it and give the configs as --gen-opt preset=...")


def mar_config(spec: str | dict | None, fallback: str = "mar_base") -> tuple[str, MARConfig]:
    """A preset name, a JSON file of MARConfig fields, or a dict of them -> (name, config)."""
    return _config(spec, fallback, PRESETS, MARConfig, "preset")


def vae_config(spec: str | dict | None, fallback: str = "kl16") -> tuple[str, KLVAEConfig]:
    return _config(spec, fallback, VAE_PRESETS, KLVAEConfig, "vae_config")


def _config(spec, fallback, presets, cls, opt):
    spec = fallback if spec is None else spec
    if isinstance(spec, str) and spec in presets:
        return spec, presets[spec]
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--gen-opt {opt}={spec}: not one of {', '.join(presets)} nor a JSON file of config fields")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"--gen-opt {opt}={spec} is not valid JSON ({exc})") from None
        name = str(path)
    else:
        data, name = spec, "custom"
    known = {f.name for f in fields(cls)}
    if not isinstance(data, dict) or set(data) - known:
        bad = sorted(set(data) - known) if isinstance(data, dict) else [type(data).__name__]
        raise UserError(f"{opt} {name}: unknown config fields {', '.join(bad)}")
    cfg = KLVAEConfig.from_dict(data) if cls is KLVAEConfig else cls(**data)
    same = [n for n, c in presets.items() if c == cfg]
    return (same[0] if same and name == "custom" else name), cfg


def read_mar_checkpoint(path: Path) -> tuple[dict, argparse.Namespace | None]:
    """The EMA state dict and the training ``args`` of a published ``checkpoint-last.pth`` (or a state-dict file)."""
    if not path.is_file():
        raise UserError(f"MAR checkpoint {path} not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path), None
    ckpt = _torch_load(path, "MAR checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a MAR training checkpoint (no 'model' entry); expected checkpoint-last.pth")
    if "model_ema" not in ckpt:
        raise UserError(f"{path} has no 'model_ema' (EMA weights), which MAR samples with; pass the published "
                        "checkpoint-last.pth")
    state, args = ckpt["model_ema"], ckpt.get("args")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: 'model_ema' is not a state dict of tensors")
    weights.require_floating(state, path)
    return state, args if isinstance(args, argparse.Namespace) else None


def read_vae_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"VAE checkpoint {path} not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = _torch_load(path, "VAE checkpoint")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a VAE checkpoint (a state dict, or one under 'model' as kl16.ckpt)")
    weights.require_floating(state, path)
    return state


def build_mar(cfg: MARConfig, state: dict, source, preset_name: str, args=None) -> MAR:
    model = MAR(cfg)
    problem = weights.strict_problem(model, state)
    if problem:
        hint = ""
        if args is not None and getattr(args, "model", None) and args.model != preset_name:
            hint = f"; its args say model={args.model}"
        if args is not None and getattr(args, "diffloss_d", None):
            hint += f" (args: diffloss {args.diffloss_d}x{args.diffloss_w})"
        raise UserError(f"MAR checkpoint {source} does not fit preset {preset_name} (DiffLoss {cfg.diffloss_d}x"
                        f"{cfg.diffloss_w}): {problem}{hint}; pick the matching --gen-opt preset=mar_base|mar_large|"
                        "mar_huge")
    weights.load_into(model, state)      # the (memory-mapped) checkpoint's tensors become the parameters
    return model


def build_vae(cfg: KLVAEConfig, state: dict, source, name: str) -> AutoencoderKL:
    """The VAE of ``state``; entries outside it (training leftovers, which MAR's own non-strict loader skips) are
    dropped with one line naming them; a missing or mis-shaped VAE entry is an error."""
    vae = AutoencoderKL(cfg)
    own = vae.state_dict()
    extra = sorted(k for k in state if k not in own)
    problem = weights.strict_problem(vae, {k: v for k, v in state.items() if k in own})
    if problem:
        raise UserError(f"VAE checkpoint {source} does not fit the LDM-layout KL VAE {name} "
                        f"({cfg.z_channels} latent channels, ch {cfg.ch} x {list(cfg.ch_mult)}): {problem}"
                        + (f"; it also holds {len(extra)} unknown entries (first: {extra[0]})" if extra else ""))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        print(f"cao2: VAE checkpoint {source}: ignoring {len(extra)} entries outside the VAE "
              f"({', '.join(extra[:3])}{more})", file=sys.stderr)
        state = {k: v for k, v in state.items() if k in own}
    weights.load_into(vae, state)
    return vae



def _torch_load(path: Path, what: str):
    try:
        return weights.torch_load(path, safe_globals=[argparse.Namespace])
    except Exception as exc:
        raise UserError(f"cannot read {what} {path}: {weights.load_error(exc)} (an argparse.Namespace of training "
                        "args is the one object admitted)") from None


def read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise UserError(f"cannot read {path} as safetensors ({type(exc).__name__})") from None
    weights.require_floating(state, path)
    return state


def sha256_of(path) -> str | None:
    return weights.file_sha256(path) if Path(path).is_file() else None
