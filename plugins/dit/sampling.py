"""DiT sampling with classifier-free guidance on diffusers schedulers, on DiT's own respaced timestep grid.

DiT samples with ``create_diffusion("50")``: the 1000-step linear schedule respaced to 50 kept timesteps
(999, 979, 958, ..., 20, 0; see ``cao2core.generators.respacing``), betas recomputed between kept steps, and the model told
the original timestep. diffusers' default 50-step grid (``leading``: 980, 960, ..., 0) is a different sampler, so
the grid is passed to the schedulers as custom timesteps:

* ``ddpm``: ``DDPMScheduler`` (ancestral, learned-range variance for learned-sigma models) on the grid: its beta
  between two kept steps is DiT's respaced beta.
* ``ddim`` (eta 0): diffusers' ``DDIMScheduler`` has no custom grid; DDIM is Euler's method on the probability-flow
  ODE in sigma = sqrt((1 - alpha-bar) / alpha-bar) space (Karras et al. 2022), so ``EulerDiscreteScheduler`` runs
  it on the grid, the latents scaled into and out of sigma space around each step.

Each sample's initial noise and every ancestral noise draw come from that sample's own generator, so a
sample does not depend on what else is in the batch.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from cao2core.generators import precision
from cao2core.generators.respacing import space_timesteps
from cao2core.generators.seeding import randn

SAMPLERS = ("ddpm", "ddim")
TRAIN_STEPS = 1000
BETAS = dict(num_train_timesteps=TRAIN_STEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def alphas_cumprod() -> torch.Tensor:
    """alpha-bar of DiT's 1000-step linear schedule, computed in float64 as DiT does, then float32."""
    betas = torch.linspace(BETAS["beta_start"], BETAS["beta_end"], TRAIN_STEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def grid(steps: int) -> list[int]:
    """The original timesteps a ``steps``-step DiT sampler visits, highest first (999, 979, ..., 20, 0 for 50)."""
    return space_timesteps(TRAIN_STEPS, steps)[::-1]


def make_scheduler(sampler: str, learned_sigma: bool, steps: int):
    """A diffusers scheduler set to DiT's ``steps``-step grid."""
    if sampler == "ddpm":
        scheduler = DDPMScheduler(**BETAS, clip_sample=False,
                                  variance_type="learned_range" if learned_sigma else "fixed_small")
    elif sampler == "ddim":
        scheduler = EulerDiscreteScheduler(**BETAS)
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}")
    scheduler.set_timesteps(timesteps=grid(steps))
    return scheduler


def guide(out: torch.Tensor, channels: int, guidance: float, cfg_channels: int) -> torch.Tensor:
    """Classifier-free guidance of a [cond; uncond] output on its first ``cfg_channels`` eps channels.

    The remaining eps channels and any learned-variance channels are the conditional ones. DiT guides 3 of the 4
    latent channels (its ``forward_with_cfg``), which the reference profile reproduces.
    """
    cond, uncond = out.chunk(2)
    k = cfg_channels
    guided = uncond[:, :k] + guidance * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


@torch.no_grad()
def sample(transformer, labels: torch.Tensor, generators: list, *, null_label: int, guidance: float,
           steps: int, sampler: str, latent_shape: tuple, dtype: torch.dtype,
           snapshot_steps: dict | None = None, autocast: torch.dtype | None = None,
           cfg_channels: int | None = None, progress=None) -> tuple[torch.Tensor, dict]:
    """Sample latents; ``snapshot_steps`` maps a 0-based step to the key its state (after that step) is kept under.

    ``autocast`` runs the transformer under autocast to that dtype; guidance and the scheduler stay fp32.
    ``cfg_channels``: how many eps channels guidance applies to (default all); ``progress()`` after every step.
    """
    snapshot_steps = snapshot_steps or {}
    device = labels.device
    channels = latent_shape[0]
    learned_sigma = transformer.config.out_channels == 2 * channels
    scheduler = make_scheduler(sampler, learned_sigma, steps)
    x = randn(generators, latent_shape, device)
    guided = guidance != 1.0
    class_in = torch.cat([labels, torch.full_like(labels, null_label)]) if guided else labels
    snapshots = {}
    for step, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), int(t), device=device, dtype=torch.long)
        with precision.autocast(device, autocast):
            out = transformer(x_in.to(dtype), timestep=t_in, class_labels=class_in).sample.float()
        if guided:
            out = guide(out, channels, guidance, cfg_channels or channels)
        if sampler == "ddim":
            x = _euler_step(scheduler, step, out[:, :channels], t, x)
        else:
            x = scheduler.step(out, t, x, generator=generators).prev_sample
        if step in snapshot_steps:
            snapshots[snapshot_steps[step]] = x.clone()
        if progress is not None:
            progress()
    return x, snapshots


def _euler_step(scheduler: EulerDiscreteScheduler, step: int, eps: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """One DDIM (eta 0) step: x is scaled to sigma space (x / sqrt(alpha-bar)) for Euler's step and back."""
    sigma, sigma_next = scheduler.sigmas[step].to(x.device), scheduler.sigmas[step + 1].to(x.device)
    x_sigma = x * (1 + sigma ** 2).sqrt()
    x_sigma = scheduler.step(eps, t, x_sigma).prev_sample
    return x_sigma / (1 + sigma_next ** 2).sqrt()
