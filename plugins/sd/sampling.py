"""Stable Diffusion sampling as ``StableDiffusionPipeline.__call__`` runs it, one generator per sample.

The scheduler is the checkpoint's own (``scheduler/scheduler_config.json``) unless ``--sampler`` names another
diffusers scheduler, which is then built ``from_config`` of the shipped config (same betas, prediction type and
timestep spacing), as diffusers' documentation swaps schedulers. Each call builds a fresh scheduler, so no state
(multistep history, step index) crosses calls.

Per sample i: the initial latents are ``randn(generators[i]) * init_noise_sigma``; every step runs the UNet on
``[uncond; cond]`` (classifier-free guidance on the raw output, epsilon or v, as the pipeline does) and
``scheduler.step(..., generator=generators)`` for schedulers that draw noise (DDPM, ancestral Euler, DDIM with
eta > 0, SDE DPM-Solver): diffusers' ``randn_tensor`` draws row i from ``generators[i]`` on its (CPU) device.
"""
from __future__ import annotations

import inspect

import diffusers
import torch

from cao2core.generators import precision
from cao2core.errors import UserError
from cao2core.generators.seeding import randn

# --sampler names -> diffusers scheduler classes; "shipped" (the default) is the checkpoint's own
SAMPLERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
            "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "dpm": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
            "heun": "HeunDiscreteScheduler"}
SHIPPED = "shipped"


def scheduler_class(sampler: str | None, shipped: type) -> type:
    """The scheduler class of ``--sampler``: a name in ``SAMPLERS``, a diffusers scheduler class name, or the
    checkpoint's own (None / ``shipped``)."""
    if sampler in (None, SHIPPED):
        return shipped
    cls = getattr(diffusers, SAMPLERS.get(sampler, sampler), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin) and sampler != "SchedulerMixin"):
        raise UserError(f"unknown --sampler {sampler!r} for sd; use {SHIPPED} (the checkpoint's scheduler), one of "
                        f"{', '.join(SAMPLERS)} or a diffusers scheduler class name")
    return cls


def make_scheduler(cls: type, config: dict, steps: int, device: torch.device):
    """A fresh scheduler of ``cls`` on ``config``, set to ``steps`` inference steps."""
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def loop_steps(cls: type, config: dict, steps: int) -> int:
    """How many UNet steps the sampler loop takes for ``steps`` inference steps (PNDM: one more; Heun: 2n - 1);
    a scheduler that cannot run on the shipped config is a one-line error here, at load."""
    try:
        return len(make_scheduler(cls, config, steps, torch.device("cpu")).timesteps)
    except Exception as exc:
        raise UserError(f"scheduler {cls.__name__} does not run {steps} steps on this checkpoint's scheduler config "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); choose another --sampler or "
                        "--sample-steps") from None


def step_kwargs(scheduler, generators: list, eta: float) -> dict:
    """``StableDiffusionPipeline.prepare_extra_step_kwargs``: eta and the generators where the step takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


def guide(out: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance of a [uncond; cond] UNet output, as the pipeline: u + g (c - u)."""
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def sample(unet, scheduler, cond: torch.Tensor, null: torch.Tensor, generators: list, *, guidance: float,
           latent_shape: tuple, dtype: torch.dtype, eta: float = 0.0, snapshot_steps: dict | None = None,
           autocast: torch.dtype | None = None, progress=None) -> tuple[torch.Tensor, dict]:
    """Latents for text embeddings ``cond`` (B, tokens, width); ``null`` is the unconditional embedding (tokens,
    width). ``snapshot_steps`` maps a 0-based loop step to the key its state (after that step) is kept under."""
    snapshot_steps = snapshot_steps or {}
    device = cond.device
    x = randn(generators, latent_shape, device)
    x = x * scheduler.init_noise_sigma
    guided = guidance > 1.0         # the pipeline's do_classifier_free_guidance
    context = torch.cat([null.expand_as(cond), cond]) if guided else cond
    context = context.to(dtype)
    extra = step_kwargs(scheduler, generators, eta)
    snapshots = {}
    for step, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        with precision.autocast(device, autocast):
            out = unet(x_in.to(dtype), t, encoder_hidden_states=context).sample.float()
        if guided:
            out = guide(out, guidance)
        x = scheduler.step(out, t, x, **extra).prev_sample
        if step in snapshot_steps:
            snapshots[snapshot_steps[step]] = x.clone()
        if progress is not None:
            progress()
    return x, snapshots
