"""The SiT generator plugin: flow-matching / stochastic-interpolant transformers on the sd-vae latent space.

Registered under the ``cao2.generators`` entry point ``sit``. ``--model`` is SiT's ``SiT-XL-2-256.pt``
(willisma/SiT), REPA's published SiT-XL/2 (sihyun-yu/REPA ``last.pt``) or a training checkpoint of either code,
in the original state-dict layout (``loading``); ``--vae`` the sd-vae of the run (default: DiT's,
stabilityai/sd-vae-ft-mse). Each family runs in its own code's conventions (``paths``, ``sampling``): SiT's data
at t = 1 with its dopri5 ODE and Euler-Maruyama SDE and guidance on 3 of 4 channels; REPA's data at t = 0 with its
Euler-Maruyama SDE and Euler ODE, guidance on every channel inside its guidance interval.

CLO: the loss is the model's own training target error (velocity alpha' x + sigma' eps; or eps; or sigma * score
against -eps) at interpolation times near the data end. CLO levels are integers on DiT's 1000-step scale: level k is
the time at which the path's sigma/alpha equals DiT's at timestep k (``paths.level_times``), so ``--clo-tmax 224``
(the DiT presets' T-hat, the default) is the corruption DiT's CLO applies; ``--gen-opt clo_times=fraction`` makes
level k the time k/1000 of the way from the data end instead. See docs/sit.md.

There is no official CaO2 code for these models: ``--profile reference`` changes only what the host reads from
``LatentSpec.reference_classifier_input`` (the DiT scripts' raw decoder output, which the sit presets follow).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from cao2core.errors import UserError
from cao2core.generators import compiling, precision, weights
from cao2core.generators.hookspecs import Corrupted, GenOption, LatentSpec, Prediction, SampleOutput, hookimpl, snapshot_steps_of

from . import loading, paths, sampling
from .model import SiT
from cao2_dit import vae_decode, vae_encode      # SiT shares DiT's sd-vae latent space

__version__ = "0.1.0"
CAO2_CONTRACT = (1, 1)          # the cao2 contract version this plugin is written for
PROFILES = ("default", "reference")
DEFAULT_LEVEL_MAX = 224         # the DiT presets' T-hat (respaced step 11 of 50) on the 1000-step scale
SIT_CFG_CHANNELS = 3            # SiT's forward_with_cfg guides output channels 0..2 only
# torchdiffeq's odeint methods that take only a state and tolerances (scipy_solver needs its own options)
ODE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2", "heun3",
               "rk4", "explicit_adams", "implicit_adams", "fixed_adams")


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("give true or false")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("give a positive number")
    return value


def _unit(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("give a time in [0, 1]")
    return value


GEN_OPTS = {
    "family": GenOption("whose code the checkpoint comes from (their interpolants run in opposite directions): sit = "
                        "willisma/SiT (data at t = 1), repa = sihyun-yu/REPA (data at t = 0)",
                        "from the checkpoint: REPA's projector entries, or SiT's learned-sigma output",
                        choices=loading.FAMILIES),
    "arch": GenOption("the model's size, checked against the checkpoint", "from the weights", choices=loading.ARCHS),
    "num_heads": GenOption("attention heads (the weights do not say; SiT's table for S/B/L/XL widths)",
                           "from the width", int),
    "path": GenOption("the interpolant it was trained on: SiT linear|gvp|vp, REPA linear|cosine", "linear",
                      choices=tuple(dict.fromkeys(paths.SIT_PATHS + paths.REPA_PATHS))),
    "prediction": GenOption("what a SiT model predicts (REPA: velocity only)", "velocity", choices=paths.PREDICTIONS),
    "cfg_channels": GenOption("output channels guidance applies to", "3 for SiT (forward_with_cfg), all for REPA", int),
    "guidance_low": GenOption("REPA: guide only at steps whose t is at least this", "0", _unit),
    "guidance_high": GenOption("REPA: guide only at steps whose t is at most this (its FID 1.42: 0.7)", "0.7", _unit),
    "heun": GenOption("REPA's ODE: Heun's correction on every step but the last", "false", _bool),
    "ode_method": GenOption("SiT's ODE: the torchdiffeq solver", "dopri5", choices=tuple(ODE_SOLVERS)),
    "atol": GenOption("SiT's ODE: absolute tolerance", "1e-6", _positive),
    "rtol": GenOption("SiT's ODE: relative tolerance", "1e-3", _positive),
    "diffusion_form": GenOption("SiT's SDE: the diffusion coefficient w_t", "sigma", choices=paths.DIFFUSION_FORMS),
    "diffusion_norm": GenOption("SiT's SDE: the diffusion coefficient's magnitude", "1.0", float),
    "last_step": GenOption("SiT's SDE: the last step", "Mean", choices=sampling.LAST_STEPS),
    "last_step_size": GenOption("SiT's SDE: the last step's size", "0.04", _positive),
    "clo_times": GenOption("CLO level k: dit = the time whose noise-to-signal ratio is DiT's at timestep k; fraction "
                           "= k/1000 of the way from the data end", "dit", choices=paths.CLO_TIMES),
    "autocast": GenOption("run the transformer forward under torch.autocast; weights keep --dtype",
                          "bf16 on CUDA with fp32 weights (default profile), else none",
                          choices=tuple(precision.AUTOCAST)),
    "compile": GenOption("torch.compile mode of the transformer", "none", choices=compiling.COMPILE_MODES),
}
# options that only one family's (or one sampler's) code has: given elsewhere they would be silently unused
APPLIES = {"guidance_low": {("repa", "sde"), ("repa", "ode")}, "guidance_high": {("repa", "sde"), ("repa", "ode")},
           "heun": {("repa", "ode")}, "prediction": {("sit", "sde"), ("sit", "ode")},
           **{k: {("sit", "ode")} for k in ("ode_method", "atol", "rtol")},
           **{k: {("sit", "sde")} for k in ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")}}
NAMES = {"sit": "SiT", "repa": "REPA"}


def _owners(where: set) -> str:
    families = sorted({f for f, _ in where})
    if len(where) == 2 * len(families):
        return " and ".join(f"{NAMES[f]}'s samplers" for f in families)
    return " and ".join(f"{NAMES[f]}'s {s} sampler" for f, s in sorted(where))


# each family's reported configuration: (guidance, guidance interval, steps per sampler)
FAMILY_DEFAULTS = {
    # SiT paper: SiT-XL/2 at cfg 1.5 (FID 2.06 with the SDE, 2.15 with dopri5); sample.py's 250 steps
    "sit": dict(guidance=1.5, interval=(0.0, 1.0), steps={"sde": 250, "ode": 250}),
    # REPA README/paper: SDE, 250 steps, cfg 1.8 on t in [0, 0.7] (FID 1.42); generate.py's ODE default 50 steps
    "repa": dict(guidance=1.8, interval=(0.0, 0.7), steps={"sde": 250, "ode": 50}),
}


@dataclass
class SiTHandle:
    transformer: SiT
    vae: object
    family: str
    settings: sampling.SamplerSettings
    level_t: torch.Tensor                   # (1000,) float64 interpolation time of each CLO level
    clo_times: str
    dtype: torch.dtype
    sources: dict = field(default_factory=dict)
    set_aside: list = field(default_factory=list)
    profile: str = "default"
    autocast: torch.dtype | None = None
    compiled: torch.nn.Module | None = None
    compile_mode: str = "none"

    def forward_module(self) -> torch.nn.Module:
        return self.compiled if self.compiled is not None else self.transformer

    @property
    def path(self) -> paths.Path:
        return self.settings.path

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.input_size, c.input_size)

    def call(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, zero: torch.Tensor | None = None):
        """The model's output (fp32) at interpolation times ``t`` (its own direction)."""
        with precision.autocast(x.device, self.autocast):
            return self.forward_module()(x.to(self.dtype), t.float(), y, zero).float()


@hookimpl
def cao2_options() -> dict:
    return GEN_OPTS


def _get(options: dict, key: str):
    """A --gen-opt value, parsed if it arrives as text (callers that bypass the host's parsing)."""
    value = options.get(key)
    if isinstance(value, str) and key in GEN_OPTS:
        opt = GEN_OPTS[key]
        if opt.choices is not None and value not in opt.choices:
            raise UserError(f"--gen-opt {key}={value}: sit takes one of {', '.join(opt.choices)}")
        try:
            return opt.parse(value)
        except (TypeError, ValueError) as exc:
            raise UserError(f"--gen-opt {key}={value}: {exc}; {opt.help}") from None
    return value


@hookimpl
def cao2_load(options: dict, device: torch.device) -> SiTHandle:
    profile = options.get("profile") or "default"
    if profile not in PROFILES:
        raise UserError(f"unknown --profile {profile!r}; use one of {', '.join(PROFILES)}")
    if (options.get("timestep_convention") or "default") != "default":
        raise UserError("--timestep-convention is DiT's; the sit generator has one level scale (see docs/sit.md)")
    if not options.get("model"):
        raise UserError("the sit generator needs --model: SiT's SiT-XL-2-256.pt, REPA's SiT-XL/2 last.pt or a "
                        "training checkpoint of either code")
    heads = _get(options, "num_heads")
    transformer, family, aside = loading.load_model(options["model"], _get(options, "family"),
                                                    _get(options, "arch"), heads)
    sampler = options.get("sampler") or "sde"
    if sampler not in sampling.SAMPLERS:
        raise UserError(f"unknown --sampler {sampler!r} for sit; use sde or ode (each family's own code)")
    for key, where in APPLIES.items():
        if options.get(key) is not None and (family, sampler) not in where:
            raise UserError(f"--gen-opt {key} is an option of {_owners(where)}, not of {NAMES[family]}'s {sampler} "
                            "sampler (docs/sit.md)")
    settings = _settings(options, family, sampler, transformer)
    from cao2_dit.loading import DEFAULT_VAE, load_vae      # the same sd-vae loading as DiT's
    vae_source = options.get("vae") or DEFAULT_VAE
    vae = load_vae(vae_source)
    if vae.config.latent_channels != transformer.config.in_channels:
        raise UserError(f"VAE {vae_source} has {vae.config.latent_channels} latent channels but the SiT expects "
                        f"{transformer.config.in_channels}; pass the VAE it was trained with (--vae)")
    dtype = precision.weights_dtype(options.get("dtype"))
    for m in (transformer, vae):
        m.eval().requires_grad_(False).to(device)
    if dtype != torch.float32:
        transformer.to(dtype)       # the VAE stays fp32, as for DiT
    clo_times = _get(options, "clo_times") or "dit"
    compile_mode = compiling.compile_mode(options)
    return SiTHandle(
        transformer=transformer, vae=vae, family=family, settings=settings,
        level_t=paths.level_times(settings.path, clo_times).to(device), clo_times=clo_times, dtype=dtype,
        sources={"model": options["model"], "vae": vae_source}, set_aside=aside, profile=profile,
        autocast=precision.autocast_dtype(_get(options, "autocast")
                                          or precision.default_autocast(device, profile, options.get("dtype"))),
        compiled=compiling.compiled(transformer, compile_mode) if compile_mode != "none" else None,
        compile_mode=compile_mode)


def _settings(options: dict, family: str, sampler: str, model: SiT) -> sampling.SamplerSettings:
    defaults = FAMILY_DEFAULTS[family]
    path_name = _get(options, "path") or "linear"
    allowed = paths.SIT_PATHS if family == "sit" else paths.REPA_PATHS
    if path_name not in allowed:
        raise UserError(f"--gen-opt path={path_name}: {family} defines {', '.join(allowed)}")
    prediction = _get(options, "prediction") or "velocity"
    steps = int(options.get("sample_steps") or defaults["steps"][sampler])
    if family == "sit" and sampler == "sde" and steps < 2:
        raise UserError("SiT's SDE sampler needs --sample-steps 2 or more (K - 1 Euler-Maruyama steps and a last step)")
    channels = model.config.in_channels
    cfg_channels = _get(options, "cfg_channels")
    if cfg_channels is None:
        cfg_channels = min(SIT_CFG_CHANNELS, channels) if family == "sit" else channels
    if not 1 <= int(cfg_channels) <= channels:
        raise UserError(f"--gen-opt cfg_channels={cfg_channels}: give a number of channels 1-{channels}")
    lo, hi = defaults["interval"]
    lo = _get(options, "guidance_low") if options.get("guidance_low") is not None else lo
    hi = _get(options, "guidance_high") if options.get("guidance_high") is not None else hi
    if lo > hi:
        raise UserError(f"REPA's guidance interval [{lo}, {hi}] is empty: guidance_low must not exceed guidance_high")
    guidance = options.get("guidance")
    s = sampling.SamplerSettings(
        family=family, sampler=sampler, steps=steps,
        guidance=float(guidance if guidance is not None else defaults["guidance"]),
        null_label=model.config.num_classes, path=paths.Path(family, path_name), prediction=prediction,
        cfg_channels=int(cfg_channels), guidance_interval=(float(lo), float(hi)))
    overrides = {k: _get(options, k) for k in ("ode_method", "atol", "rtol", "diffusion_form", "diffusion_norm",
                                               "last_step", "last_step_size", "heun") if options.get(k) is not None}
    return replace(s, **overrides)


@hookimpl
def cao2_latent_spec(handle: SiTHandle) -> LatentSpec:
    label_space = "in1k" if handle.num_classes == 1000 else None
    # no official CaO2 code runs SiT; the presets follow the DiT scripts, which fed the raw decoder output
    return LatentSpec(handle.latent_shape, handle.num_classes, (1, paths.DIT_STEPS - 1), DEFAULT_LEVEL_MAX,
                      label_space, sample_steps=handle.settings.steps, reference_classifier_input="raw")


@hookimpl
def cao2_describe(handle: SiTHandle) -> dict:
    s = handle.settings
    sampler = {"name": s.sampler, "steps": s.steps, "guidance": s.guidance, "cfg_channels": s.cfg_channels}
    if handle.family == "sit" and s.sampler == "ode":
        sampler.update(method=s.ode_method, atol=s.atol, rtol=s.rtol,
                       interval=list(paths.sit_interval(s.path, s.prediction, sde=False)))
    elif handle.family == "sit":
        sampler.update(diffusion_form=s.diffusion_form, diffusion_norm=s.diffusion_norm, last_step=s.last_step,
                       last_step_size=s.last_step_size)
    else:
        sampler.update(guidance_interval=list(s.guidance_interval), **({"heun": s.heun} if s.sampler == "ode" else {}))
    level_t = handle.level_t.cpu()
    return {
        "family": "sit", "code": handle.family,
        "model": {"source": handle.sources["model"], "sha256": weights.source_sha256(handle.sources["model"]),
                  "config": handle.transformer.config.to_dict(), "set_aside": len(handle.set_aside)},
        "vae": {"source": handle.sources["vae"], "sha256": _vae_sha256(handle.sources["vae"]),
                "scaling_factor": handle.vae.config.scaling_factor, "shift_factor": handle.vae.config.shift_factor},
        "path": s.path.name, "prediction": s.prediction, "data_at_t": s.path.data_at,
        "sampler": sampler, "null_label": handle.num_classes,
        "clo": {"target": s.prediction, "level_scale": handle.clo_times,
                "t_at_level_1": float(level_t[1]), f"t_at_level_{DEFAULT_LEVEL_MAX}": float(level_t[DEFAULT_LEVEL_MAX])},
        "profile": handle.profile, "dtype": precision.dtype_name(handle.dtype),
        "autocast": precision.dtype_name(handle.autocast), "compile": handle.compile_mode,
    }


def _vae_sha256(source: str):
    from cao2_dit.loading import sha256_of
    return sha256_of(source, "vae")


@hookimpl
def cao2_sample(handle: SiTHandle, labels: torch.Tensor, generators: list, snapshot_steps: list,
                progress=None) -> SampleOutput:
    wanted = snapshot_steps_of(snapshot_steps, handle.settings.steps)
    with torch.no_grad():
        x, snapshots = sampling.sample(handle.call, labels, generators, handle.settings, handle.latent_shape,
                                       snapshot_steps=wanted, progress=progress)
    return SampleOutput(latents=x, snapshots=snapshots)


@hookimpl
def cao2_decode(handle: SiTHandle, latents: torch.Tensor) -> torch.Tensor:
    return vae_decode(handle.vae, latents)


@hookimpl
def cao2_encode(handle: SiTHandle, pixels: torch.Tensor, generators: list) -> torch.Tensor:
    return vae_encode(handle.vae, pixels, generators)


@dataclass
class SiTCondition:
    labels: torch.Tensor        # label ids fed to the model (the null id, num_classes, for kind "null")
    zero: torch.Tensor          # (B,) bool: kind "zero" -> a zero label embedding


@hookimpl
def cao2_condition(handle: SiTHandle, labels: torch.Tensor, kinds: list) -> SiTCondition:
    null = torch.tensor([k == "null" for k in kinds], device=labels.device)
    zero = torch.tensor([k == "zero" for k in kinds], device=labels.device)
    return SiTCondition(torch.where(null, torch.full_like(labels, handle.num_classes), labels), zero)


@hookimpl
def cao2_corrupt(handle: SiTHandle, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> Corrupted:
    t = handle.level_t.to(latents.device)[levels]
    a, da, s, ds = (c.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1))) for c in handle.path.coefficients(t))
    x_t = a * latents + s * noise
    prediction = handle.settings.prediction
    if prediction == "velocity":
        target = da * latents + ds * noise          # d x_t / dt in the model's own direction
    elif prediction == "noise":
        target = noise
    else:
        target = -noise                             # SiT's score loss: || sigma_t s + eps ||^2
    return Corrupted(inputs=x_t, levels=levels, target=target, extras={"t": t.float(), "sigma": s})


@hookimpl
def cao2_predict(handle: SiTHandle, corrupted: Corrupted, condition: SiTCondition) -> Prediction:
    zero = condition.zero if bool(condition.zero.any()) else None
    out = handle.call(corrupted.inputs, corrupted.extras["t"], condition.labels, zero)
    if handle.settings.prediction == "score":
        out = out * corrupted.extras["sigma"]
    return Prediction(pred=out, target=corrupted.target)
