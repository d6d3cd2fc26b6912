"""The DiT generator plugin: diffusers ``DiTTransformer2DModel`` + ``AutoencoderKL``.

Registered under the ``cao2.generators`` entry point ``dit``. Without ``--model`` it loads the embedded
MNIST world shipped in ``worlds/mnist``; with ``--model`` a diffusers DiT folder or hub id, or the original
``DiT-XL-2-256x256.pt``. The weights run with the timestep-embedding frequencies they were trained with
(``loading``) and sample on DiT's respaced grid (``sampling``).

CLO corruption is ``q_sample`` on the 1000-step linear schedule. Timestep conventions:

* ``default``: level t in [1, T-hat] on the 1000-step scale; noise at alpha-bar(t) and the model is told t.
* ``reference``: as the official CaO2 code: level k in [1, T-hat] indexes the sampler's respaced grid (50 steps:
  original t 20, 41, ..., 224 for k = 1..11); noise at alpha-bar(grid[k]) but the model is told k.

``--profile reference`` (options ``profile``) selects the reference convention and guidance on 3 of the 4 eps
channels, as DiT's ``forward_with_cfg``; ``--gen-opt cfg_channels=N`` and ``--timestep-convention`` override.

``--gen-opt autocast=bf16|fp16`` runs the transformer forward (sampling and CLO) under ``torch.autocast``
while its weights keep ``--dtype``; the latents, CLO's Adam state and the VAE stay fp32. Without it: bf16 on CUDA
under the default profile with fp32 weights, none on a CPU and under ``--profile reference`` (the official code
runs fp32 with TF32), see ``cao2core.generators.precision.default_autocast``.

``--gen-opt compile=default|reduce-overhead|max-autotune`` runs the transformer through ``torch.compile`` with
that mode (``reduce-overhead`` adds CUDA graphs; ``aot_eager`` is the debugging backend, no code generation).
Rows with the ``zero`` condition run the eager module, whose label embedders are hooked per call.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from cao2core.generators import compiling, precision
from cao2core.errors import UserError
from cao2core.generators.hookspecs import Corrupted, GenOption, LatentSpec, Prediction, SampleOutput, hookimpl, snapshot_steps_of
from cao2core.generators.respacing import space_timesteps

from . import loading, sampling

__version__ = "0.1.0"
CAO2_CONTRACT = (1, 1)       # the cao2 contract version this plugin is written for
CONVENTIONS = ("default", "reference")
PROFILES = ("default", "reference")
REFERENCE_CFG_CHANNELS = 3    # DiT's forward_with_cfg guides eps channels 0..2 only
GEN_OPTS = {
    "num_heads": GenOption("attention heads of an original-layout checkpoint (weights do not say; inferred from the "
                           "width for DiT-S/B/L/XL)", "from the width", int),
    "autocast": GenOption("run the transformer forward under torch.autocast; weights keep --dtype",
                          "bf16 on CUDA with fp32 weights (default profile), else none",
                          choices=tuple(precision.AUTOCAST)),
    "compile": GenOption("torch.compile mode of the transformer", "none", choices=compiling.COMPILE_MODES),
    "timestep_freqs": GenOption("the timestep-embedding frequencies the weights were trained with: dit = i/128 (every "
                                "published DiT), diffusers = i/127", "dit, or the folder's cao2.json",
                                choices=tuple(loading.TIMESTEP_FREQS)),
    "cfg_channels": GenOption("eps channels classifier-free guidance applies to", "all; 3 under --profile reference",
                              int),
}


@dataclass
class DiTHandle:
    transformer: DiTTransformer2DModel
    vae: AutoencoderKL
    alphas_cumprod: torch.Tensor
    label_space: str | None
    guidance: float
    steps: int
    sampler: str
    convention: str
    dtype: torch.dtype
    sources: dict = field(default_factory=dict)
    timestep_freqs: str = "dit"             # the timestep-embedding frequencies the weights were trained with
    cfg_channels: int | None = None         # eps channels guidance applies to; None: all
    profile: str = "default"
    autocast: torch.dtype | None = None     # autocast dtype of the transformer forward; None: plain --dtype
    compiled: torch.nn.Module | None = None  # torch.compile of the transformer (--gen-opt compile)
    compile_mode: str = "none"

    @cached_property
    def respaced_timesteps(self) -> torch.Tensor:
        """The raw timestep of each respaced step k (CLO under the reference convention), built once."""
        return torch.tensor(space_timesteps(sampling.TRAIN_STEPS, self.steps), device=self.alphas_cumprod.device)

    def forward_module(self, zero_rows: bool = False) -> torch.nn.Module:
        """The transformer to call: compiled, unless zero-label hooks must run (they would recompile it)."""
        return self.compiled if self.compiled is not None and not zero_rows else self.transformer

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)


@hookimpl
def cao2_options() -> dict:
    return GEN_OPTS


@hookimpl
def cao2_load(options: dict, device: torch.device) -> DiTHandle:
    profile = options.get("profile") or "default"
    if profile not in PROFILES:
        raise UserError(f"unknown --profile {profile!r}; use one of {', '.join(PROFILES)}")
    convention = options.get("timestep_convention") or ("reference" if profile == "reference" else "default")
    if convention not in CONVENTIONS:
        raise UserError(f"unknown --timestep-convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    t_src, v_src, defaults = loading.resolve(options.get("model"), options.get("vae"), options.get("dataset"))
    steps = _sample_steps(options, defaults)      # before the weights load: a wrong count costs nothing
    sampler = options.get("sampler") or defaults.get("sampler", "ddpm")
    if sampler not in sampling.SAMPLERS:
        raise UserError(f"unknown --sampler {sampler!r} for dit; use one of {', '.join(sampling.SAMPLERS)}")
    autocast = precision.autocast_dtype(options.get("autocast")
                                        or precision.default_autocast(device, profile, options.get("dtype")))
    compile_mode = compiling.compile_mode(options)
    heads = options.get("num_heads")
    if heads is not None and not str(heads).isdigit():
        raise UserError(f"--gen-opt num_heads={heads}: give a whole number of attention heads (DiT-XL/2: 16)")
    dtype = precision.weights_dtype(options.get("dtype"))
    transformer = loading.load_transformer(t_src, int(heads) if heads else None, dtype)
    freqs = options.get("timestep_freqs") or defaults.get("timestep_freqs", "dit")
    loading.set_timestep_freqs(transformer, freqs)
    cfg_channels = _cfg_channels(options.get("cfg_channels"), profile, transformer.config.in_channels)
    vae = loading.load_vae(v_src)
    if vae.config.latent_channels != transformer.config.in_channels:
        raise UserError(f"VAE {v_src} has {vae.config.latent_channels} latent channels but the DiT expects "
                        f"{transformer.config.in_channels}; pass the VAE this DiT was trained with")
    for m in (transformer, vae):   # the VAE stays fp32: decoding in half precision visibly degrades images
        m.eval().requires_grad_(False).to(device)
    n = transformer.config.num_embeds_ada_norm
    guidance = options.get("guidance")
    compiled = compiling.compiled(transformer, compile_mode) if compile_mode != "none" else None
    return DiTHandle(
        transformer=transformer, vae=vae,
        alphas_cumprod=sampling.alphas_cumprod().to(device),
        label_space=defaults.get("label_space") or ("in1k" if n == 1000 else None),
        guidance=float(guidance if guidance is not None else defaults.get("guidance", 2.7)),
        steps=steps,
        sampler=sampler, convention=convention, dtype=dtype,
        sources={"transformer": t_src, "vae": v_src}, autocast=autocast, compiled=compiled,
        compile_mode=compile_mode, timestep_freqs=freqs, cfg_channels=cfg_channels, profile=profile)


def _sample_steps(options: dict, defaults: dict) -> int:
    """The sampler's step count: ``--sample-steps``, else the world's cao2.json, else DiT's 50; DiT respaces its
    1000-step schedule, so 1 to 1000 (``respacing.space_timesteps``)."""
    if options.get("sample_steps") is not None:
        steps, origin = options["sample_steps"], "--sample-steps"
    else:
        steps, origin = defaults.get("sample_steps", 50), f"sample_steps in {defaults.get(loading.SOURCE_KEY)}"
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= sampling.TRAIN_STEPS:
        raise UserError(f"{origin} {steps!r}: DiT keeps sampler steps out of its {sampling.TRAIN_STEPS}-step "
                        f"schedule; give a whole number from 1 to {sampling.TRAIN_STEPS}")
    return steps


def _cfg_channels(value, profile: str, channels: int) -> int | None:
    if value is None:
        return min(REFERENCE_CFG_CHANNELS, channels) if profile == "reference" else None
    try:
        k = int(value)
    except ValueError:
        k = 0
    if not 1 <= k <= channels:
        raise UserError(f"--gen-opt cfg_channels={value}: give a whole number of latent channels 1-{channels}")
    return k


@hookimpl
def cao2_latent_spec(handle: DiTHandle) -> LatentSpec:
    official_input = "raw"      # the official DiT scripts: the decoder output resized to 224, nothing else
    if handle.convention == "reference":
        # the official loop draws k from range(1, steps // 4): 1..11 of the 50 respaced steps
        top = max(1, min(handle.steps // 4 - 1, handle.steps - 1))
        return LatentSpec(handle.latent_shape, handle.num_classes, (1, max(1, handle.steps - 1)), top,
                          handle.label_space, sample_steps=handle.steps, reference_classifier_input=official_input)
    return LatentSpec(handle.latent_shape, handle.num_classes, (1, 999), 224, handle.label_space,
                      sample_steps=handle.steps, reference_classifier_input=official_input)


@hookimpl
def cao2_describe(handle: DiTHandle) -> dict:
    return {
        "family": "dit",
        "transformer": {"source": handle.sources["transformer"], "sha256": loading.sha256_of(handle.sources["transformer"], "transformer"),
                        "config": dict(handle.transformer.config)},
        "vae": {"source": handle.sources["vae"], "sha256": loading.sha256_of(handle.sources["vae"], "vae"),
                "scaling_factor": handle.vae.config.scaling_factor, "shift_factor": handle.vae.config.shift_factor},
        "sampler": handle.sampler, "sample_steps": handle.steps, "guidance": handle.guidance,
        "sampler_timesteps": sampling.grid(handle.steps), "timestep_freqs": handle.timestep_freqs,
        "cfg_channels": handle.cfg_channels or handle.latent_shape[0], "profile": handle.profile,
        "null_label": handle.num_classes, "timestep_convention": handle.convention,
        "dtype": precision.dtype_name(handle.dtype), "autocast": precision.dtype_name(handle.autocast),
        "compile": handle.compile_mode,
    }


@hookimpl
def cao2_sample(handle: DiTHandle, labels: torch.Tensor, generators: list, snapshot_steps: list,
                progress=None) -> SampleOutput:
    wanted = snapshot_steps_of(snapshot_steps, handle.steps)
    x, snapshots = sampling.sample(handle.forward_module(), labels, generators, null_label=handle.num_classes,
                                   guidance=handle.guidance, steps=handle.steps, sampler=handle.sampler,
                                   latent_shape=handle.latent_shape, dtype=handle.dtype, snapshot_steps=wanted,
                                   autocast=handle.autocast, cfg_channels=handle.cfg_channels, progress=progress)
    return SampleOutput(latents=x, snapshots=snapshots)


def _vae_factors(vae: AutoencoderKL) -> tuple[float, float]:
    return vae.config.scaling_factor, vae.config.shift_factor or 0.0


def vae_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled sd-vae latents -> pixels in [-1, 1] (the SiT plugin shares this latent space)."""
    scale, shift = _vae_factors(vae)
    with torch.no_grad():
        return vae.decode(latents.float() / scale + shift).sample


def vae_encode(vae: AutoencoderKL, pixels: torch.Tensor, generators: list) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents, sample i of the posterior drawn from ``generators[i]``."""
    scale, shift = _vae_factors(vae)
    with torch.no_grad():
        z = vae.encode(pixels.float()).latent_dist.sample(generator=generators)
    return (z - shift) * scale


@hookimpl
def cao2_decode(handle: DiTHandle, latents: torch.Tensor) -> torch.Tensor:
    return vae_decode(handle.vae, latents)


@hookimpl
def cao2_encode(handle: DiTHandle, pixels: torch.Tensor, generators: list) -> torch.Tensor:
    return vae_encode(handle.vae, pixels, generators)


@dataclass
class DiTCondition:
    labels: torch.Tensor        # label ids fed to the model (null id for kind "null")
    zero: torch.Tensor          # (B,) bool: kind "zero" -> the label embedding is replaced by zeros


@hookimpl
def cao2_condition(handle: DiTHandle, labels: torch.Tensor, kinds: list) -> DiTCondition:
    kinds_t = list(kinds)
    null = torch.tensor([k == "null" for k in kinds_t], device=labels.device)
    zero = torch.tensor([k == "zero" for k in kinds_t], device=labels.device)
    return DiTCondition(torch.where(null, torch.full_like(labels, handle.num_classes), labels), zero)


@hookimpl
def cao2_corrupt(handle: DiTHandle, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor,
                 generators: list) -> Corrupted:
    if handle.convention == "reference":     # noise of the respaced step k; predict tells the model k itself
        noise_t = handle.respaced_timesteps.to(levels.device)[levels]
    else:
        noise_t = levels
    a = handle.alphas_cumprod[noise_t].view(-1, *([1] * (latents.ndim - 1)))
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    return Corrupted(inputs=x_t, levels=levels, target=noise)


@hookimpl
def cao2_predict(handle: DiTHandle, corrupted: Corrupted, condition: DiTCondition) -> Prediction:
    # the latents stay fp32 leaves: autocast's casts are differentiable, so their gradient comes back in fp32
    amp = precision.autocast(corrupted.inputs.device, handle.autocast)
    with _zero_label_embedding(handle.transformer, condition.zero), amp:
        out = handle.forward_module(bool(condition.zero.any()))(
            corrupted.inputs.to(handle.dtype), timestep=corrupted.levels, class_labels=condition.labels).sample
    channels = corrupted.target.shape[1]
    return Prediction(pred=out[:, :channels].float(), target=corrupted.target)


@contextmanager
def _zero_label_embedding(transformer: DiTTransformer2DModel, zero: torch.Tensor):
    """Replace the label embedding by zeros for the rows of kind ``zero`` (every block has its own table)."""
    if not bool(zero.any()):
        yield
        return
    keep = (~zero).to(torch.float32)
    hooks = [m.register_forward_hook(lambda _m, _i, out: out * keep.to(out.dtype).view(-1, 1))
             for name, m in transformer.named_modules() if name.endswith("class_embedder")]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
