"""Masked autoregressive sampling with the cosine mask schedule and classifier-free guidance on the head's eps.

Sample i draws everything random from ``generators[i]`` alone, on the CPU, in this order: its token order, then for
every step its DiffLoss start noise and the noise of each ancestral step. So a sample does not depend on what else
is in the batch, nor on the device. With guidance the batch runs as [cond; null] internally and only the
conditional half is kept; guidance 1.0 runs the conditional batch alone (the batch size is kept either way).
"""
from __future__ import annotations

import torch

from cao2core.generators import precision
from cao2core.generators.seeding import randn

from .diffusion import GaussianDiffusion
from .masking import guidance_at, mask_from_orders, masked_after_steps, random_orders
from .model import MAR

CFG_SCHEDULES = ("linear", "constant")


@torch.no_grad()
def sample(model: MAR, labels: torch.Tensor, generators: list, *, steps: int, guidance: float,
           cfg_schedule: str = "linear", temperature: float = 1.0, diffusion: GaussianDiffusion,
           snapshot_steps: dict | None = None, autocast: torch.dtype | None = None,
           clip_x0: float | None = None, progress=None) -> tuple[torch.Tensor, dict]:
    """Return (scaled image-shaped latents (B, C, H, W), {key: canvas after that step, zeros where unfilled}).

    ``snapshot_steps`` maps a 0-based step to the key its canvas is returned under; ``progress()`` after each step.
    """
    snapshot_steps = snapshot_steps or {}
    cfg = model.cfg
    device, b, L, D = labels.device, len(labels), cfg.seq_len, cfg.token_dim
    orders = random_orders(generators, L).to(device)
    tokens = torch.zeros(b, L, D, device=device)
    guided = guidance != 1.0
    cond = model.condition_embedding(labels, ["class"] * b)
    if guided:
        cond = torch.cat([cond, model.fake_latent.expand(b, -1)])
    amp = precision.autocast(device, autocast if device.type == "cuda" else None)
    snapshots, masked = {}, L
    for step, left in enumerate(masked_after_steps(L, steps)):
        n = masked - left
        if n > 0:
            mask = mask_from_orders(orders, masked)
            with amp:
                z = model.forward_mae(torch.cat([tokens, tokens]) if guided else tokens,
                                      torch.cat([mask, mask]) if guided else mask, cond)
            pos = orders[:, left:masked]                                   # (B, n) the tokens this step predicts
            idx = torch.cat([pos, pos]) if guided else pos
            zc = torch.gather(z, 1, idx[..., None].expand(-1, -1, z.shape[-1])).reshape(-1, z.shape[-1])
            scale = guidance_at(guidance, cfg_schedule, L, left)

            def net(x, t, zc=zc, scale=scale):
                with amp:
                    if not guided:
                        return model.head(x, t, zc).float()
                    out = model.head(torch.cat([x, x]), torch.cat([t, t]), zc).float()
                cond_out, null_out = out.chunk(2)
                eps = null_out[:, :D] + scale * (cond_out[:, :D] - null_out[:, :D])
                return torch.cat([eps, cond_out[:, D:]], dim=1)

            draw = lambda: randn(generators, (n, D), device).reshape(-1, D)  # noqa: E731
            new = diffusion.sample(net, draw(), draw, temperature, clip_x0).reshape(b, n, D)
            tokens = tokens.scatter(1, pos[..., None].expand(-1, -1, D), new.to(tokens.dtype))
        masked = left
        if step in snapshot_steps:
            snapshots[snapshot_steps[step]] = model.unpatchify(tokens.clone())
        if progress is not None:
            progress()
    return model.unpatchify(tokens), snapshots
