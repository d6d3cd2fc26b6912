"""The MAR generator plugin: masked autoregressive generation with a per-token diffusion head (Li et al. 2024).

Registered under the ``cao2.generators`` entry point ``mar``. Without ``--model`` it loads the embedded MNIST
world in ``worlds/mnist``; with ``--model checkpoint-last.pth --vae kl16.ckpt --gen-opt preset=mar_base`` the
published checkpoints (``preset`` defaults to the ``model`` recorded in the checkpoint's ``args``).

Latents are the scaled VAE latents, image-shaped (C, H/stride, W/stride): (16, 16, 16) for MAR at 256 px,
(4, 8, 8) for the world; the plugin patchifies them into tokens itself.

CLO on MAR (CaO2-MAR), ``LatentSpec.corruption == "mask"``:

* ``corrupt`` masks tokens. Every iteration each sample draws, from its own generator and in this order, its
  mask ratio (MAR's truncated normal on ``--gen-opt mask_ratio=0.7,1``, mean 1, sd 0.25), its token order, its
  per-token diffusion timesteps and its per-token eps (``--gen-opt noise=fixed`` uses the engine's fixed
  per-sample noise as eps instead and draws none). Rows of a batch mask different counts; ``MAR.forward_mae``
  pads the encoder's rows and hides the padding from attention, so a sample's CLO does not depend on which
  samples share its batch (up to float summation order).
* levels: every token draws its own head timestep t uniformly on 0..T-hat (``level_max``: level range
  1-999, default 999 as CaO2-MAR; ``--clo-tmax`` caps it); the engine's per-sample ``levels`` are not used.
* ``predict`` runs the encoder on the visible tokens of the latent (the gradient path), the decoder, and the
  DiffLoss head on x_t built from the *detached* latent; ``Prediction(eps_hat, eps, weight=mask)``: the
  engine's loss is the masked-token mean squared error + lambda * the max over masked tokens. ``--gen-opt vb=1``
  adds the masked mean of the variational-bound term as ``aux_loss`` (on by default under ``--profile
  reference``: the official loss is the masked mean of mse + vb).
* precision (``autocasts``): on CUDA the forward passes of sampling and CLO run under bf16 autocast (latents and
  Adam state fp32); under ``--profile reference`` sampling, and the selection's decode and classifier
  (``LatentSpec.reference_selection_autocast``), run under fp16 and CLO in fp32, as the official script; on a CPU
  everything is fp32.
* conditions: ``class`` = class embedding, ``null`` = the learned ``fake_latent``, ``zero`` = a zero vector in
  every buffer slot (CaO2-MAR's zero-label embedding).

``--gen-opt compile=default|reduce-overhead|max-autotune`` compiles the encoder and decoder block stacks and the
DiffLoss head (``MAR.compile_parts``); ``reduce-overhead`` adds CUDA graphs, which suit the head's sampling
loop (``diffloss_steps`` small MLP calls per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cao2core.generators import compiling, precision
from cao2core.errors import UserError
from cao2core.generators.hookspecs import Corrupted, GenOption, LatentSpec, Prediction, SampleOutput, hookimpl, snapshot_steps_of

from . import loading, sampling
from .diffusion import GaussianDiffusion
from .masking import mask_from_orders, num_masked, random_orders, truncated_normal_ratio
from .model import MAR
from .vae import AutoencoderKL

__version__ = "0.1.0"
CAO2_CONTRACT = (1, 1)       # the cao2 contract version this plugin is written for
LEVEL_RANGE, DEFAULT_LEVEL = (1, 999), 999
GEN_OPTS = {
    "preset": GenOption("MAR size: mar_base, mar_large, mar_huge or a JSON file of MARConfig fields",
                        "the checkpoint's args.model"),
    "vae_config": GenOption("KL VAE config: kl16, mnist_small or a JSON file of its fields", "kl16"),
    "cfg_schedule": GenOption("guidance schedule over the AR steps", "linear", choices=sampling.CFG_SCHEDULES),
    "temperature": GenOption("DiffLoss sampling temperature (scales the added noise)", 1.0, float),
    "diffloss_steps": GenOption("DiffLoss sampler steps (respaced from 1000)", 100, int),
    "mask_ratio": GenOption("CLO mask ratio range LO,HI (truncated normal, mean 1, sd 0.25)", "0.7,1"),
    "vb": GenOption("add the head's variational-bound term to the CLO loss (1/0)", "0; 1 under --profile reference",
                    choices=("0", "1", "true", "false", "yes", "no")),
    "noise": GenOption("CLO eps: fresh every iteration (CaO2-MAR) or the engine's fixed per-sample noise", "fresh",
                       choices=("fresh", "fixed")),
    "autocast": GenOption("autocast dtype of the model's forward passes on GPUs (sampling and CLO)",
                          "bf16; under --profile reference fp16 sampling and fp32 CLO, as the official script",
                          choices=tuple(precision.AUTOCAST)),
    "clip_x0": GenOption("clamp the head's predicted x0 to [-C, C] at every diffusion step", "none (the world: 6)"),
    "compile": GenOption("torch.compile mode of the block stacks and the head", "none", choices=compiling.COMPILE_MODES),
}


@dataclass
class MARHandle:
    model: MAR
    vae: AutoencoderKL
    preset: str
    label_space: str | None
    guidance: float
    cfg_schedule: str
    steps: int
    diffloss_steps: int
    temperature: float
    clip_x0: float | None
    mask_ratio: tuple[float, float]
    vb: bool
    fixed_noise: bool
    autocast: torch.dtype | None            # sampling's forward passes (GPUs only; None on a CPU)
    clo_autocast: torch.dtype | None        # CLO's forward passes (the official script's CLO is fp32)
    compile_mode: str
    sampler_diffusion: GaussianDiffusion
    diffusion: GaussianDiffusion = field(default_factory=GaussianDiffusion.training)
    sources: dict = field(default_factory=dict)


def _float(options, key, default):
    value = options.get(key)
    try:
        return float(default if value is None else value)
    except (TypeError, ValueError):
        raise UserError(f"--gen-opt {key}={value} is not a number") from None


def _int(options, key, default, least=1):
    value = options.get(key)
    try:
        n = int(default if value is None else value)
    except (TypeError, ValueError):
        raise UserError(f"--gen-opt {key}={value} is not an integer") from None
    if n < least:
        raise UserError(f"{key} must be at least {least} for mar, got {n}")
    return n


def _flag(options, key) -> bool:
    value = str(options.get(key) or "0").lower()
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise UserError(f"--gen-opt {key}={value}: use 1 or 0")
    return value in ("1", "true", "yes")


def parse_clip(value) -> float | None:
    if value is None or str(value).lower() == "none":
        return None
    try:
        clip = float(value)
    except ValueError:
        raise UserError(f"--gen-opt clip_x0={value}: give a positive number or none") from None
    if not clip > 0:
        raise UserError(f"--gen-opt clip_x0={value}: give a positive number or none")
    return clip


def parse_mask_ratio(text) -> tuple[float, float]:
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).replace(":", ",").split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--gen-opt mask_ratio={text}: give two numbers LO,HI with 0 < LO <= HI <= 1") from None
    if not 0 < lo <= hi <= 1:
        raise UserError(f"--gen-opt mask_ratio={text} is outside (0, 1]: give LO,HI with 0 < LO <= HI <= 1")
    return lo, hi


@hookimpl
def cao2_options() -> dict:
    return GEN_OPTS


@hookimpl
def cao2_load(options: dict, device: torch.device) -> MARHandle:
    if options.get("sampler"):
        raise UserError("--sampler is a DiT option; mar has one sampler (masked autoregressive, cosine schedule)")
    if (options.get("profile") or "default") not in ("default", "reference"):
        raise UserError(f"unknown --profile {options.get('profile')!r}; use default or reference")
    if (options.get("timestep_convention") or "default") != "default":
        raise UserError("--timestep-convention is a DiT option; mar's CLO levels are the head's per-token timesteps")
    model_src = options.get("model")
    if model_src is None:
        world = loading.world_dir(options.get("dataset") or "mnist")
        if world is None:
            raise UserError(f"no embedded MAR world for dataset {options.get('dataset')!r}; pass --model "
                            "checkpoint-last.pth --vae kl16.ckpt")
        model_src = str(world)
    path = Path(model_src)
    defaults = loading.read_defaults(path) if path.is_dir() else {}
    settings = _settings(options, defaults, device)   # every option is checked before any weight is read
    model, vae, preset, sources = _load_weights(path, options, defaults)
    for m in (model, vae):
        m.eval().requires_grad_(False).to(device)
    if settings["compile_mode"] != "none":
        model.compile_parts(lambda fn: compiling.compiled(fn, settings["compile_mode"]))
    n = model.cfg.class_num
    return MARHandle(model=model, vae=vae, preset=preset,
                     label_space=defaults.get("label_space") or ("in1k" if n == 1000 else None),
                     sampler_diffusion=GaussianDiffusion.respaced(settings["diffloss_steps"]), sources=sources,
                     **settings)


def autocasts(options: dict, device: torch.device) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(sampling's, CLO's) autocast dtype. MAR casts no weights: ``--dtype bf16|fp16`` is read as that autocast;
    else ``--gen-opt autocast``, else bf16 on CUDA (``precision.default_autocast``); under ``--profile reference``
    sampling runs under fp16 and CLO in fp32, as the official script. Autocast is a GPU option here: on a CPU every
    forward pass is fp32."""
    dtype, reference = options.get("dtype") or "fp32", options.get("profile") == "reference"
    autocast = precision.autocast_dtype(dtype if dtype != "fp32" else (
        options.get("autocast") or ("fp16" if reference else precision.default_autocast(device))))
    if device.type != "cuda":
        return None, None
    return autocast, None if reference else autocast


def _settings(options: dict, defaults: dict, device: torch.device) -> dict:
    schedule = options.get("cfg_schedule") or defaults.get("cfg_schedule", "linear")
    if schedule not in sampling.CFG_SCHEDULES:
        raise UserError(f"--gen-opt cfg_schedule={schedule}: use one of {', '.join(sampling.CFG_SCHEDULES)}")
    autocast, clo_autocast = autocasts(options, device)
    noise = options.get("noise") or "fresh"
    if noise not in ("fresh", "fixed"):
        raise UserError(f"--gen-opt noise={noise}: use fresh (CaO2-MAR) or fixed")
    diffloss_steps = _int(options, "diffloss_steps", defaults.get("diffloss_steps", 100))
    if diffloss_steps > 1000:
        raise UserError(f"--gen-opt diffloss_steps={diffloss_steps}: the head has 1000 diffusion steps")
    guidance = _float(options, "guidance", defaults.get("guidance", 2.9))
    if guidance < 0:
        raise UserError(f"--guidance must be 0 or more, got {guidance}")
    return dict(guidance=guidance, cfg_schedule=schedule,
                steps=_int(options, "sample_steps", defaults.get("sample_steps", 32)),
                diffloss_steps=diffloss_steps,
                temperature=_float(options, "temperature", defaults.get("temperature", 1.0)),
                clip_x0=parse_clip(options.get("clip_x0", defaults.get("clip_x0"))),
                mask_ratio=parse_mask_ratio(options.get("mask_ratio") or "0.7,1"),
                vb=_flag(options, "vb") if options.get("vb") is not None else options.get("profile") == "reference",
                fixed_noise=noise == "fixed", autocast=autocast, clo_autocast=clo_autocast, compile_mode=compiling.compile_mode(options))


def _load_weights(path: Path, options: dict, defaults: dict):
    """(MAR, VAE, preset name, sources) from a world-like folder or a published checkpoint."""
    vae_src, args = options.get("vae"), None
    if path.is_dir():                                  # a world-like folder: mar.safetensors, vae.safetensors
        preset_name, cfg = loading.mar_config(options.get("preset") or defaults.get("mar"))
        model_file = path / "mar.safetensors"
        if not model_file.is_file():
            raise UserError(f"{path} has no mar.safetensors (a MAR world folder holds mar.safetensors, "
                            "vae.safetensors and cao2.json)")
        vae_src = vae_src or str(path / "vae.safetensors")
        vae_name, vcfg = loading.vae_config(options.get("vae_config") or defaults.get("vae"))
        state = loading.read_safetensors(model_file)
    else:
        if vae_src is None:
            raise UserError("a MAR checkpoint needs its VAE: pass --vae kl16.ckpt")
        vae_name, vcfg = loading.vae_config(options.get("vae_config"))
        state, args = loading.read_mar_checkpoint(path)
        model_file = path
        preset_name, cfg = loading.mar_config(options.get("preset") or getattr(args, "model", None))
    model = loading.build_mar(cfg, state, str(path), preset_name, args)
    if vcfg.embed_dim != cfg.vae_embed_dim or vcfg.stride != cfg.vae_stride:
        raise UserError(f"VAE config {vae_name} gives {vcfg.embed_dim} channels at stride {vcfg.stride} but MAR "
                        f"{preset_name} expects {cfg.vae_embed_dim} at stride {cfg.vae_stride}")
    vae = loading.build_vae(vcfg, loading.read_vae_checkpoint(Path(vae_src)), vae_src, vae_name)
    return model, vae, preset_name, {"model": str(model_file), "vae": str(vae_src)}


@hookimpl
def cao2_latent_spec(handle: MARHandle) -> LatentSpec:
    return LatentSpec(handle.model.cfg.latent_shape, handle.model.cfg.class_num, LEVEL_RANGE, DEFAULT_LEVEL,
                      handle.label_space, corruption="mask", sample_steps=handle.steps,
                      # the official script classifies a JPEG buffer of the decoded snapshots, decoding and
                      # classifying under fp16 autocast
                      reference_classifier_input="jpeg", reference_selection_autocast="fp16")


@hookimpl
def cao2_describe(handle: MARHandle) -> dict:
    return {
        "family": "mar",
        "model": {"source": handle.sources["model"], "sha256": loading.sha256_of(handle.sources["model"]),
                  "preset": handle.preset, "config": handle.model.cfg.to_dict()},
        "vae": {"source": handle.sources["vae"], "sha256": loading.sha256_of(handle.sources["vae"]),
                "config": handle.vae.cfg.to_dict()},
        "guidance": handle.guidance, "cfg_schedule": handle.cfg_schedule, "sample_steps": handle.steps,
        "diffloss_steps": handle.diffloss_steps, "temperature": handle.temperature, "clip_x0": handle.clip_x0,
        "clo": {"mask_ratio": list(handle.mask_ratio), "vb": handle.vb,
                "noise": "fixed" if handle.fixed_noise else "fresh",
                "levels": "per-token head timestep, uniform on 0..T-hat"},
        "autocast": precision.dtype_name(handle.autocast), "clo_autocast": precision.dtype_name(handle.clo_autocast),
        "compile": handle.compile_mode,
    }


@hookimpl
def cao2_sample(handle: MARHandle, labels: torch.Tensor, generators: list, snapshot_steps: list,
                progress=None) -> SampleOutput:
    wanted = snapshot_steps_of(snapshot_steps, handle.steps)
    x, snapshots = sampling.sample(handle.model, labels, generators, steps=handle.steps, guidance=handle.guidance,
                                   cfg_schedule=handle.cfg_schedule, temperature=handle.temperature,
                                   diffusion=handle.sampler_diffusion, snapshot_steps=wanted,
                                   autocast=handle.autocast, clip_x0=handle.clip_x0, progress=progress)
    return SampleOutput(latents=x, snapshots=snapshots)


@hookimpl
def cao2_decode(handle: MARHandle, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return handle.vae.decode_scaled(latents.float())


@hookimpl
def cao2_encode(handle: MARHandle, pixels: torch.Tensor, generators: list) -> torch.Tensor:
    shape = (handle.vae.cfg.embed_dim, pixels.shape[-2] // handle.vae.cfg.stride, pixels.shape[-1] // handle.vae.cfg.stride)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(pixels.device)
    with torch.no_grad():
        return handle.vae.encode_scaled(pixels.float(), noise)


@hookimpl
def cao2_condition(handle: MARHandle, labels: torch.Tensor, kinds: list) -> torch.Tensor:
    return handle.model.condition_embedding(labels, list(kinds))


@hookimpl
def cao2_corrupt(handle: MARHandle, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor,
                 generators: list, level_max: int) -> Corrupted:
    model, device = handle.model, latents.device
    L, D = model.cfg.seq_len, model.cfg.token_dim
    tokens = model.patchify(latents)                  # keeps the graph: the gradient path is the visible tokens
    lo, hi = handle.mask_ratio
    masks, ts, eps = [], [], []
    for g in generators:
        # one sample's draws, all from its own generator in this order: ratio, order, t, eps (unless fixed)
        ratio = truncated_normal_ratio(torch.rand((), generator=g).item(), lo, hi)
        masks.append(mask_from_orders(random_orders([g], L), num_masked(L, ratio))[0])
        ts.append(torch.randint(0, int(level_max) + 1, (L,), generator=g))
        if not handle.fixed_noise:
            eps.append(torch.randn((L, D), generator=g))
    mask, t = torch.stack(masks).to(device), torch.stack(ts).to(device)
    eps = model.patchify(noise.float()).to(device) if handle.fixed_noise else torch.stack(eps).to(device)
    x0 = tokens.detach()
    x_t = handle.diffusion.q_sample(x0.reshape(-1, D), t.reshape(-1), eps.reshape(-1, D)).reshape(x0.shape)
    return Corrupted(inputs=tokens, levels=levels, target=eps,
                     extras={"mask": mask, "t": t, "x_t": x_t, "x0": x0})


@hookimpl
def cao2_predict(handle: MARHandle, corrupted: Corrupted, condition: torch.Tensor) -> Prediction:
    model, ex = handle.model, corrupted.extras
    tokens, mask = corrupted.inputs, ex["mask"]
    b, L, D = tokens.shape
    with precision.autocast(tokens.device, handle.clo_autocast):
        z = model.forward_mae(tokens, mask, condition)
        out = model.head(ex["x_t"].reshape(-1, D), ex["t"].reshape(-1), z.reshape(b * L, -1)).float()
    weight = mask[..., None].float()
    aux = None
    if handle.vb:
        vb = handle.diffusion.vb_terms(out, ex["x0"].reshape(-1, D), ex["x_t"].reshape(-1, D),
                                       ex["t"].reshape(-1)).reshape(b, L)
        aux = (vb * mask).sum(1) / mask.sum(1).clamp_min(1)
    return Prediction(pred=out[:, :D].reshape(b, L, D), target=corrupted.target, weight=weight, aux_loss=aux)
