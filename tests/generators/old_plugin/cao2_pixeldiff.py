"""cao2-pixeldiff: a pixel-space diffusion generator for cao2, a class-conditional diffusers ``UNet2DModel`` that
denoises images directly (the latents are the pixels), sampled with DDIM.

FROZEN TEST FIXTURE. This is a plugin as a user wrote it for cao2's first plugin contract (1.0, before ``profile``
existed), following the guide of the time to the letter: it states no contract version, it knows exactly the
generic options of that contract, and it refuses every other key itself. tests/generators/test_compatibility.py
installs it with its own entry point and runs it. Never edit it to fit a change in cao2: if cao2 breaks it, cao2
breaks the plugins its users installed.

``--model`` is a ``UNet2DModel`` folder; without it the UNet is built with random weights from
``--gen-opt init_seed`` (``size``, ``channels`` its shape). ``--gen-opt eta`` is DDIM's eta.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

from cao2core.errors import UserError
from cao2core.hookspecs import Corrupted, LatentSpec, Prediction, SampleOutput, hookimpl, snapshot_steps_of

__version__ = "0.3.0"
CLASSES = 10                     # MNIST's label space
NULL, ZERO = CLASSES, CLASSES + 1     # the CFG null label and a label whose embedding is all zeros
# the generic keys cao2 passes every generator ("options always holds every generic key")
GENERIC = ("model", "vae", "dataset", "sampler", "sample_steps", "guidance", "timestep_convention", "dtype")
OWN = {"size": (int, 16), "channels": (int, 1), "eta": (float, 0.0), "init_seed": (int, 0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PixelDiff:
    def __init__(self, unet: UNet2DModel, steps: int, guidance: float, eta: float, source: str, init_seed: int):
        self.unet, self.steps, self.guidance, self.eta = unet, steps, guidance, eta
        self.source, self.init_seed = source, init_seed
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(unet.device)

    def eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        return self.unet(x.to(dtype), t, class_labels=labels).sample.float()


def _own(options: dict, key: str):
    parse, default = OWN[key]
    value = options.get(key)
    if value is None:
        return default
    try:
        return parse(value)
    except ValueError:
        raise UserError(f"--gen-opt {key}={value}: pixeldiff needs a {parse.__name__}") from None


@hookimpl
def cao2_load(options, device):
    unknown = sorted(set(options) - set(GENERIC) - set(OWN))
    if unknown:
        raise UserError(f"unknown --gen-opt {unknown[0]!r} for pixeldiff; known: {', '.join(sorted(OWN))}")
    if (options.get("sampler") or "ddim") != "ddim":
        raise UserError("pixeldiff samples with DDIM only (--gen-opt eta=1 for DDPM-like sampling)")
    if (options.get("timestep_convention") or "default") != "default":
        raise UserError("--timestep-convention is a DiT option; pixeldiff has none")
    if options.get("vae"):
        raise UserError("pixeldiff works on pixels: it has no VAE")
    dtype = DTYPES.get(options.get("dtype") or "fp32")
    if dtype is None:
        raise UserError(f"unknown --dtype {options['dtype']!r}; pixeldiff takes {', '.join(DTYPES)}")
    size, channels, seed = _own(options, "size"), _own(options, "channels"), _own(options, "init_seed")
    if options.get("model"):
        try:
            unet = UNet2DModel.from_pretrained(options["model"])
        except (OSError, ValueError) as exc:
            raise UserError(f"--model {options['model']}: not a UNet2DModel folder ({exc})") from None
    else:
        with torch.random.fork_rng(devices=[]):       # random weights, without touching the caller's RNG
            torch.manual_seed(seed)
            unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                               block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, add_attention=False,
                               num_class_embeds=CLASSES + 2)
    if unet.config.num_class_embeds != CLASSES + 2:
        raise UserError(f"--model {options['model']}: pixeldiff needs {CLASSES + 2} class embeddings")
    with torch.no_grad():
        unet.class_embedding.weight[ZERO] = 0
    unet.eval().requires_grad_(False).to(device)
    if dtype != torch.float32:
        unet.to(dtype)
    steps = int(options.get("sample_steps") or 25)
    guidance = float(options["guidance"]) if options.get("guidance") is not None else 1.5
    return PixelDiff(unet, steps, guidance, _own(options, "eta"), options.get("model") or "random", seed)


@hookimpl
def cao2_latent_spec(handle):
    c, size = handle.unet.config.in_channels, handle.unet.config.sample_size
    return LatentSpec(shape=(c, size, size), num_classes=CLASSES, level_range=(1, 999), default_level_max=200,
                      label_space="mnist", sample_steps=handle.steps)


@hookimpl
def cao2_describe(handle):
    return {"family": "pixeldiff", "model": handle.source, "init_seed": handle.init_seed, "steps": handle.steps,
            "guidance": handle.guidance, "eta": handle.eta}


@hookimpl
def cao2_sample(handle, labels, generators, snapshot_steps):
    spec = cao2_latent_spec(handle)
    wanted = snapshot_steps_of(snapshot_steps, handle.steps)
    device = labels.device
    x = torch.stack([torch.randn(spec.shape, generator=g) for g in generators]).to(device)
    grid = torch.linspace(999, 0, handle.steps).round().long().tolist()
    snapshots = {}
    with torch.no_grad():
        for i, t in enumerate(grid):
            a = handle.alphas_cumprod[t]
            a_prev = handle.alphas_cumprod[grid[i + 1]] if i + 1 < len(grid) else torch.tensor(1.0, device=device)
            both = torch.cat([labels, torch.full_like(labels, NULL)])
            eps_c, eps_u = handle.eps(torch.cat([x, x]), torch.full((2 * len(x),), t, device=device), both).chunk(2)
            eps = eps_u + handle.guidance * (eps_c - eps_u)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            sigma = handle.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if handle.eta > 0 and i + 1 < len(grid):
                x = x + sigma * torch.stack([torch.randn(spec.shape, generator=g) for g in generators]).to(device)
            if i in wanted:
                snapshots[wanted[i]] = x.clone()
    return SampleOutput(latents=x, snapshots=snapshots)


@hookimpl
def cao2_decode(handle, latents):
    return latents


@hookimpl
def cao2_encode(handle, pixels, generators):
    return pixels


@hookimpl
def cao2_condition(handle, labels, kinds):
    replace = {"class": None, "null": NULL, "zero": ZERO}
    return torch.stack([label if replace[k] is None else torch.full_like(label, replace[k])
                        for label, k in zip(labels, kinds)])


@hookimpl
def cao2_corrupt(handle, latents, levels, noise):
    a = handle.alphas_cumprod[levels].view(-1, 1, 1, 1)
    return Corrupted(inputs=a.sqrt() * latents + (1 - a).sqrt() * noise, levels=levels, target=noise)


@hookimpl
def cao2_predict(handle, corrupted, condition):
    return Prediction(pred=handle.eps(corrupted.inputs, corrupted.levels, condition), target=corrupted.target)
