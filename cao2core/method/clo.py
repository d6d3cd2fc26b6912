"""Condition-aware latent optimization (CLO), batched.

Every latent of a batch gets exactly its own gradient: the loss is computed per sample and summed, and Adam
is elementwise, so optimizing B latents together equals optimizing each alone with its own Adam. The
generator stays frozen (no weight gradients). Randomness per sample: the noise is drawn once from the
sample's ``clo-noise`` generator and kept for the whole optimization; the level (timestep) is drawn every
iteration from its ``clo-level`` generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..generators.contract import PluginError
from ..errors import UserError
from ..generators.seeding import randn
from ..kernels import reference
from ..kernels.reference import clo_loss  # noqa: F401  (the semantics every kernel backend is tested against)


class NonFiniteLatents(Exception):
    """A latent became NaN or Inf during CLO."""

    def __init__(self, iteration: int, rows: list[int]):
        super().__init__(f"non-finite latents at CLO iteration {iteration} (rows {rows})")
        self.iteration, self.rows = iteration, rows

    @classmethod
    def first_of(cls, first_bad: dict[int, int]) -> "NonFiniteLatents":
        """The failure at the earliest iteration of ``{row: first non-finite iteration}``."""
        it = min(first_bad.values())
        return cls(it, sorted(r for r, i in first_bad.items() if i == it))


@dataclass
class CLOSettings:
    iters: int = 100
    lr: float = 6e-4
    lam: float = 10.0
    level_min: int = 1
    level_max: int = 11
    kernels: str = "auto"   # backend of the fused loss and Adam ops (see cao2core.kernels)


def optimize(gen, handle, latents: torch.Tensor, labels: torch.Tensor, kinds: list[str],
             noise_gens: list[torch.Generator], level_gens: list[torch.Generator], settings: CLOSettings,
             progress=None) -> torch.Tensor:
    """Optimize a batch of latents under the frozen generator; returns the optimized latents (fp32, detached).
    Raises ``NonFiniteLatents`` if any row became NaN/Inf."""
    z, first_bad = optimize_rows(gen, handle, latents, labels, kinds, noise_gens, level_gens, settings, progress)
    if first_bad:
        raise NonFiniteLatents.first_of(first_bad)
    return z


def optimize_rows(gen, handle, latents: torch.Tensor, labels: torch.Tensor, kinds: list[str],
                  noise_gens: list[torch.Generator], level_gens: list[torch.Generator], settings: CLOSettings,
                  progress=None, curves: dict | None = None) -> tuple[torch.Tensor, dict[int, int]]:
    """``optimize`` for rows of different classes: (latents, {row: first iteration it was non-finite}).

    A row that turns NaN/Inf is put back to its start every iteration, so it cannot spread through the
    others' forward passes; the other rows' results are unchanged (rows are independent). The check stays on
    the device (no synchronisation per iteration). ``curves``, if given, receives each row's loss terms per
    iteration: ``mean`` and ``max`` (rows, iters), float32 on the CPU.
    """
    z = latents.detach().float().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    if settings.iters == 0:
        return z.detach(), {}
    first_bad = torch.full((len(z),), -1, dtype=torch.long, device=z.device)
    start = z.detach().clone()
    noise = randn(noise_gens, z.shape[1:], z.device)
    condition = gen.condition(handle=handle, labels=labels, kinds=kinds)
    opt = kernels.LatentAdam([z], lr=settings.lr, backend=settings.kernels)
    terms = []
    for it in range(settings.iters):
        levels = torch.cat([torch.randint(settings.level_min, settings.level_max + 1, (1,), generator=g)
                            for g in level_gens]).to(z.device)
        corrupted = gen.corrupt(handle=handle, latents=z, levels=levels, noise=noise, generators=noise_gens,
                                level_max=settings.level_max)
        p = gen.predict(handle=handle, corrupted=corrupted, condition=condition)
        loss = kernels.clo_loss(p.pred, p.target, settings.lam, p.weight, backend=settings.kernels)
        if p.aux_loss is not None:
            loss = loss + p.aux_loss
        if it == 0 and not loss.requires_grad:
            raise PluginError(f"generator plugin {getattr(gen, 'label', gen)}: no gradient reaches the latents "
                              "through cao2_corrupt and cao2_predict (detached or computed under torch.no_grad); "
                              "the plugin breaks the cao2 contract (docs/plugins.md)")
        if curves is not None:
            with torch.no_grad():
                terms.append(torch.stack(reference.clo_terms(p.pred, p.target, p.weight), 1))
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            bad = ~torch.isfinite(z).flatten(1).all(1)
            first_bad = torch.where(bad & (first_bad < 0), it, first_bad)
            z.copy_(torch.where(bad.view(-1, *[1] * (z.dim() - 1)), start, z))
        if progress is not None:
            progress(1)
    rows = first_bad.tolist()
    if curves is not None:
        stacked = torch.stack(terms, 2).float().cpu()          # (rows, 2, iters), moved once per chunk
        curves["mean"], curves["max"] = stacked[:, 0], stacked[:, 1]
    return z.detach(), {r: i for r, i in enumerate(rows) if i >= 0}


def check_levels(settings: CLOSettings, level_range: tuple[int, int]) -> None:
    lo, hi = level_range
    if not lo <= settings.level_min <= settings.level_max <= hi:
        raise UserError(f"--clo-tmax {settings.level_max} is outside this generator's range {lo}-{hi}; "
                        f"choose a value in {max(lo, settings.level_min)}-{hi}")
