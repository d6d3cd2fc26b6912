"""DiT sampling with classifier-free guidance on diffusers schedulers (DDPM ancestral or DDIM).

Each sample's initial noise and every ancestral noise draw come from that sample's own generator, so a
sample does not depend on what else is in the batch.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from cao2core import precision

SAMPLERS = ("ddpm", "ddim")
BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def noise_schedule() -> DDPMScheduler:
    """The 1000-step linear schedule DiT was trained with."""
    return DDPMScheduler(**BETAS)


def make_scheduler(sampler: str, learned_sigma: bool):
    if sampler == "ddpm":
        return DDPMScheduler(**BETAS, clip_sample=False,
                             variance_type="learned_range" if learned_sigma else "fixed_small")
    if sampler == "ddim":
        return DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False)
    raise ValueError(f"sampler must be one of {SAMPLERS}")


@torch.no_grad()
def sample(transformer, labels: torch.Tensor, generators: list, *, null_label: int, guidance: float,
           steps: int, sampler: str, latent_shape: tuple, dtype: torch.dtype,
           snapshot_steps: dict | None = None, autocast: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """Sample latents; ``snapshot_steps`` maps a 0-based step to the key its state (after that step) is kept under.

    ``autocast`` runs the transformer under autocast to that dtype; guidance and the scheduler stay fp32.
    """
    snapshot_steps = snapshot_steps or {}
    device = labels.device
    channels = latent_shape[0]
    learned_sigma = transformer.config.out_channels == 2 * channels
    scheduler = make_scheduler(sampler, learned_sigma)
    scheduler.set_timesteps(steps)
    x = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(device)
    guided = guidance != 1.0
    class_in = torch.cat([labels, torch.full_like(labels, null_label)]) if guided else labels
    snapshots = {}
    for step, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), int(t), device=device, dtype=torch.long)
        with precision.autocast(device, autocast):
            out = transformer(x_in.to(dtype), timestep=t_in, class_labels=class_in).sample.float()
        if guided:
            cond, uncond = out.chunk(2)
            eps = uncond[:, :channels] + guidance * (cond[:, :channels] - uncond[:, :channels])
            out = torch.cat([eps, cond[:, channels:]], dim=1)
        if sampler == "ddim":
            x = scheduler.step(out[:, :channels], t, x, eta=0.0).prev_sample
        else:
            x = scheduler.step(out, t, x, generator=generators).prev_sample
        if step in snapshot_steps:
            snapshots[snapshot_steps[step]] = x.clone()
    return x, snapshots
