"""The Stable Diffusion generator plugin: a text-conditioned diffusers pipeline (SD 1.x/2.x) for any label space.

Registered under the ``cao2.generators`` entry point ``sd``. ``--model`` is a diffusers ``StableDiffusionPipeline``
folder or hub id (default: SD 1.5); ``--dataset`` names the label space whose class names fill the prompt template
(``--gen-opt prompt="a photo of a {name}"``): the shipped ``cifar10`` and ``cifar100``, an ImageNet label space
(its names from the shipped synonyms) or a file of ``ID NAME`` lines. See docs/sd.md.

* Sampling: the checkpoint's scheduler (or ``--sampler``), classifier-free guidance with the empty prompt as the
  unconditional input, ``--guidance`` (default 7.5) and ``--sample-steps`` (default 50) as the pipeline's defaults.
* CLO: a level is a training timestep t; ``corrupt`` is the DDPM forward process of the shipped betas
  (``DDPMScheduler.add_noise``, as diffusers' training script) and ``predict`` the UNet's output against its
  target: the noise for epsilon-prediction checkpoints, the velocity sqrt(a)eps - sqrt(1-a)x for v-prediction ones.
  Conditions: ``class`` = the class prompt, ``null`` = the empty prompt, ``zero`` = a zero text embedding.
* Pixels: decoded at the sampling resolution (``--gen-opt size``, default the UNet's), then resized to
  ``--gen-opt store_size`` if given (antialiased bilinear), e.g. 32 for CIFAR; ``encode`` resizes back up first.
* Precision: the text encoder and VAE compute in the dtype their files store (fp16 files in fp32 on a CPU), the
  UNet in ``--dtype``; ``--gen-opt autocast`` and ``compile`` as for DiT.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cao2core.generators import compiling, precision
from cao2core.errors import UserError
from cao2core.generators.hookspecs import Corrupted, GenOption, LatentSpec, Prediction, SampleOutput, hookimpl, snapshot_steps_of

from . import loading, prompts, sampling

__version__ = "0.1.0"
CAO2_CONTRACT = (1, 1)       # the cao2 contract version this plugin is written for
DEFAULT_GUIDANCE, DEFAULT_STEPS = 7.5, 50      # StableDiffusionPipeline.__call__'s defaults
# alpha-bar at DiT's default T-hat (224 on its 1000-step linear schedule): the default T-hat of a checkpoint is the
# timestep of its own schedule with this much signal left (SD's scaled-linear schedule: 299)
REFERENCE_ALPHA_BAR = 0.5914


def parse_size(text) -> tuple[int, int]:
    """``N`` or ``HxW`` pixels -> (H, W)."""
    if isinstance(text, int):
        parts = [text, text]
    elif isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).lower().replace(",", "x").split("x")
        if len(parts) == 1:
            parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except (ValueError, TypeError):
        raise ValueError("give N or HxW pixels, e.g. 512 or 512x768") from None
    if h < 1 or w < 1:
        raise ValueError("sizes are positive pixel counts")
    return h, w


GEN_OPTS = {
    "prompt": GenOption("prompt template: {name} is the class name, {synonyms} its ImageNet synonyms (else the name)",
                        prompts.DEFAULT_TEMPLATE, prompts.parse_template),
    "size": GenOption("sampling resolution in pixels, N or HxW, a multiple of the VAE's downsampling (8)",
                      "the UNet's sample_size x 8 (SD 1.5: 512)", parse_size),
    "store_size": GenOption("resize the decoded images to N or HxW pixels (antialiased bilinear), e.g. 32 for "
                            "CIFAR; the selection classifier sees them at this size", "none", parse_size),
    "eta": GenOption("DDIM's eta (0: deterministic); schedulers without eta ignore it", 0.0, float),
    "variant": GenOption("weight-file variant to read, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors",
                         "none"),
    "autocast": GenOption("run the UNet forward under torch.autocast; weights keep --dtype",
                          "bf16 on CUDA with fp32 weights (default profile), else none",
                          choices=tuple(precision.AUTOCAST)),
    "compile": GenOption("torch.compile mode of the UNet", "none", choices=compiling.COMPILE_MODES),
}


@dataclass
class SDHandle:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    texts: prompts.TextConditions
    scheduler_class: type                   # the sampler's diffusers scheduler class
    scheduler_config: dict                  # as the checkpoint ships it
    train_scheduler: object                 # DDPMScheduler on the shipped betas: CLO's forward process
    size: tuple[int, int]                   # sampling resolution (pixels)
    store_size: tuple[int, int] | None
    guidance: float
    steps: int                              # inference steps (--sample-steps)
    loop_steps: int                         # UNet evaluations of the sampler loop (snapshot steps 0 .. this - 1)
    eta: float
    dtype: torch.dtype                      # the UNet's weights
    records: dict = field(default_factory=dict)
    autocast: torch.dtype | None = None
    compiled: object = None
    compile_mode: str = "none"

    def forward_module(self):
        return self.compiled if self.compiled is not None else self.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = vae_scale_factor(self.vae)
        return (self.unet.config.in_channels, self.size[0] // f, self.size[1] // f)

    @property
    def prediction_type(self) -> str:
        return self.train_scheduler.config.prediction_type

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell, as StableDiffusionPipeline computes it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _option(options: dict, key: str, default=None):
    """A --gen-opt value, parsed by cao2 through GEN_OPTS (Generator.parse_options); ``default`` when not given."""
    value = options.get(key)
    return default if value is None else value


@hookimpl
def cao2_options() -> dict:
    return GEN_OPTS


@hookimpl
def cao2_label_spaces() -> dict:
    return prompts.shipped_spaces()


@hookimpl
def cao2_load(options: dict, device: torch.device) -> SDHandle:
    if importlib.util.find_spec("transformers") is None:
        raise UserError("the sd generator needs transformers for its CLIP text encoder: pip install 'cao2[sd]'")
    if (options.get("profile") or "default") != "default":
        raise UserError("--profile reference reproduces a generator's official CaO2 code; there is none for Stable "
                        "Diffusion, so sd runs the default profile only")
    if (options.get("timestep_convention") or "default") != "default":
        raise UserError("--timestep-convention is a DiT setting; sd tells the UNet the noise level's own timestep")
    names = prompts.ClassNames.of_dataset(options.get("dataset"))
    template = _option(options, "prompt", prompts.DEFAULT_TEMPLATE)
    variant = options.get("variant") or None
    autocast = precision.autocast_dtype(options.get("autocast")
                                        or precision.default_autocast(device, "default", options.get("dtype")))
    compile_mode = compiling.compile_mode(options)
    dtype = precision.weights_dtype(options.get("dtype"))

    folder = loading.resolve(options.get("model"), variant)
    index = loading.check_index(folder)
    # the sampler and its step count are checked on the scheduler's config before any weights load
    shipped_cls, scheduler_config, scheduler_file = loading.load_scheduler_config(folder / "scheduler")
    sampler_cls = sampling.scheduler_class(options.get("sampler"), shipped_cls)
    steps = int(options.get("sample_steps") or DEFAULT_STEPS)
    most = scheduler_config.get("num_train_timesteps", 1000)
    if not 1 <= steps <= most:
        raise UserError(f"--sample-steps {steps}: the scheduler of {folder} has {most} training timesteps to sample "
                        f"with; give 1 to {most}")
    loop_steps = sampling.loop_steps(sampler_cls, scheduler_config, steps)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    unet = loading.load_diffusers(UNet2DConditionModel, folder / "unet", "unet", variant)
    vae_folder = loading.resolve_vae(options.get("vae"), folder, variant)
    vae = loading.load_diffusers(AutoencoderKL, vae_folder, "vae", variant)
    text_encoder = loading.load_text_encoder(folder / "text_encoder", variant)
    tokenizer = loading.load_tokenizer(folder / "tokenizer", index["tokenizer"][1])
    _check_parts(unet.module, vae.module, text_encoder.module, folder)

    for part in (unet, vae, text_encoder):
        part.module.eval().requires_grad_(False).to(device)
        if device.type == "cpu" and part.module.dtype == torch.float16:
            part.module.float()     # fp16 kernels are slow or missing on CPUs; fp32 holds every fp16 value exactly
    if unet.module.dtype != dtype:
        with loading.quiet():       # diffusers warns about casting with .to() even when nothing must stay fp32
            unet.module.to(dtype)

    f = vae_scale_factor(vae.module)
    native = unet.module.config.sample_size
    native = tuple(native) if isinstance(native, (tuple, list)) else (native, native)
    size = _option(options, "size", (native[0] * f, native[1] * f))
    if size[0] % f or size[1] % f:
        raise UserError(f"--gen-opt size={size[0]}x{size[1]}: both sides must be multiples of {f} (the VAE's "
                        "downsampling)")
    guidance = options.get("guidance")
    records = {"model": str(folder), "label_space": names.space.name, "unet": unet.record(),
               "text_encoder": text_encoder.record(), "tokenizer": tokenizer.record(), "vae": vae.record(),
               "scheduler": {"class": shipped_cls.__name__, "config": scheduler_config,
                             "sha256": loading.files_sha256([scheduler_file])}}
    return SDHandle(
        unet=unet.module, text_encoder=text_encoder.module, vae=vae.module,
        texts=prompts.TextConditions(tokenizer.module, text_encoder.module, names, template, device),
        scheduler_class=sampler_cls, scheduler_config=scheduler_config,
        train_scheduler=DDPMScheduler.from_config(scheduler_config), size=size,
        store_size=_option(options, "store_size"),
        guidance=float(DEFAULT_GUIDANCE if guidance is None else guidance), steps=steps,
        loop_steps=loop_steps,
        eta=float(_option(options, "eta", 0.0)), dtype=dtype, records=records, autocast=autocast,
        compiled=compiling.compiled(unet.module, compile_mode) if compile_mode != "none" else None,
        compile_mode=compile_mode)


def _check_parts(unet, vae, text_encoder, folder) -> None:
    """Refuse pipelines that are not SD 1.x/2.x text-to-image (inpainting, SDXL, LCM, upscalers) in one line."""
    c = unet.config
    problems = [
        (c.in_channels != vae.config.latent_channels or c.out_channels != c.in_channels,
         f"its UNet takes {c.in_channels} channels and returns {c.out_channels} for a VAE of "
         f"{vae.config.latent_channels} (an inpainting or image-conditioned UNet?)"),
        (c.cross_attention_dim != text_encoder.config.hidden_size,
         f"its UNet attends to {c.cross_attention_dim}-wide text but the text encoder gives "
         f"{text_encoder.config.hidden_size}"),
        (c.addition_embed_type is not None or c.class_embed_type is not None or c.time_cond_proj_dim is not None,
         "its UNet takes extra conditions (SDXL, an upscaler or a guidance-distilled model)")]
    for bad, why in problems:
        if bad:
            raise UserError(f"{folder} is not a Stable Diffusion 1.x/2.x text-to-image pipeline: {why}")


@hookimpl
def cao2_latent_spec(handle: SDHandle) -> LatentSpec:
    top = handle.train_scheduler.config.num_train_timesteps - 1
    kept = (handle.train_scheduler.alphas_cumprod >= REFERENCE_ALPHA_BAR).nonzero()   # alpha-bar falls with t
    default = int(kept.max()) if len(kept) else 1
    return LatentSpec(handle.latent_shape, len(handle.texts.names), (1, top), min(max(default, 1), top),
                      label_space=None, sample_steps=handle.loop_steps)


@hookimpl
def cao2_describe(handle: SDHandle) -> dict:
    return {
        "family": "sd", **handle.records,
        "sampler": handle.scheduler_class.__name__, "sample_steps": handle.steps, "loop_steps": handle.loop_steps,
        "guidance": handle.guidance, "eta": handle.eta, "prediction_type": handle.prediction_type,
        "prompt": handle.texts.template, "null_prompt": "", "size": list(handle.size),
        "store_size": list(handle.store_size) if handle.store_size else None,
        "dtype": {"unet": precision.dtype_name(handle.dtype),
                  "text_encoder": precision.dtype_name(handle.text_encoder.dtype),
                  "vae": precision.dtype_name(handle.vae.dtype)},
        "autocast": precision.dtype_name(handle.autocast), "compile": handle.compile_mode,
    }


@hookimpl
def cao2_sample(handle: SDHandle, labels: torch.Tensor, generators: list, snapshot_steps: list,
                progress=None) -> SampleOutput:
    wanted = snapshot_steps_of(snapshot_steps, handle.loop_steps)
    scheduler = sampling.make_scheduler(handle.scheduler_class, handle.scheduler_config, handle.steps, labels.device)
    x, snapshots = sampling.sample(handle.forward_module(), scheduler, handle.texts.of_labels(labels),
                                   handle.texts.null, generators, guidance=handle.guidance,
                                   latent_shape=handle.latent_shape, dtype=handle.dtype, eta=handle.eta,
                                   snapshot_steps=wanted, autocast=handle.autocast, progress=progress)
    return SampleOutput(latents=x, snapshots=snapshots)


def resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixels to (H, W), bilinear with antialiasing (torchvision's Resize on tensors)."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)


@hookimpl
def cao2_decode(handle: SDHandle, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        pixels = handle.vae.decode((latents.float() / handle.scaling_factor).to(handle.vae.dtype)).sample.float()
    return resize(pixels, handle.store_size) if handle.store_size else pixels


@hookimpl
def cao2_encode(handle: SDHandle, pixels: torch.Tensor, generators: list) -> torch.Tensor:
    # stored images (store_size) go back up to the sampling resolution the VAE and UNet work at
    x = resize(pixels.float(), handle.size).to(handle.vae.dtype)
    with torch.no_grad():
        z = handle.vae.encode(x).latent_dist.sample(generator=generators)
    return z.float() * handle.scaling_factor


@hookimpl
def cao2_condition(handle: SDHandle, labels: torch.Tensor, kinds: list) -> torch.Tensor:
    return handle.texts.of_kinds(labels, list(kinds))


@hookimpl
def cao2_corrupt(handle: SDHandle, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> Corrupted:
    ddpm = handle.train_scheduler
    t = levels.long()
    noisy = ddpm.add_noise(latents, noise, t)
    kind = handle.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        # a function of the latent too: the loss is then 1/alpha-bar x the epsilon loss of the implied eps-hat
        target = ddpm.get_velocity(latents, noise, t)
    elif kind == "sample":
        target = latents
    else:
        raise UserError(f"scheduler prediction_type {kind!r} is not one cao2 knows (epsilon, v_prediction, sample)")
    return Corrupted(inputs=noisy, levels=t, target=target)


@hookimpl
def cao2_predict(handle: SDHandle, corrupted: Corrupted, condition: torch.Tensor) -> Prediction:
    # the latents stay fp32 leaves: autocast's and .to()'s casts are differentiable, the gradient comes back fp32
    with precision.autocast(corrupted.inputs.device, handle.autocast):
        out = handle.forward_module()(corrupted.inputs.to(handle.dtype), corrupted.levels,
                                      encoder_hidden_states=condition.to(handle.dtype)).sample
    return Prediction(pred=out.float(), target=corrupted.target.float())
