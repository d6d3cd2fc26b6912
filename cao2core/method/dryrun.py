"""``cao2 run --dry-run [RANKS]``: the work a run would do, its FLOPs and, measured here, its projected time.

Nothing is written. The FLOPs come from torch's FLOP counter on one pool sample and one CLO iteration of one
latent (forward, backward and Adam) of the loaded generator; the throughput from timing one pool chunk and
two CLO iterations of one chunk at ``--batch-size`` on the run's device (on a CPU at most 8 samples, which bounds
the dry run's own time), each after an untimed call at the same size, whose extra time (compilation, autotuning,
allocator growth) is reported apart as a once-per-rank cost. A bar shows each sampling pass's steps.
Classification and decoding are left out of the projection (they are a small share for DiT/MAR-sized
generators).
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..environment import stderr_is_terminal

from . import clo
from ..generators.seeding import unit_generators
from .workplan import chunks, class_groups

CPU_TIMED_CHUNK = 8     # samples timed per stage on a CPU


def count_flops(fn):
    """(FLOPs torch's counter sees while ``fn`` runs, what ``fn`` returned)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


def timed(fn, device):
    """(wall seconds of ``fn``, waiting for the GPU's queued work, what ``fn`` returned)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, result


def _fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def report(cfg, gen, handle, spec, space, settings, device, ranks: int) -> str:
    ipc, pool = cfg.ipc, cfg.ipc * (cfg.pool_factor if cfg.select != "none" else 1)
    groups = class_groups([ipc] * len(space.ids), cfg.batch_size)
    per_rank = [[p for g, group in enumerate(groups) if g % ranks == r for p in group] for r in range(ranks)]
    params = sum(p.numel() for m in _modules(handle) for p in m.parameters())
    work = Workload(cfg, gen, handle, space, settings, device)

    steps = spec.sample_steps

    def sample(n: int, what: str):
        """work.sample(n), saying what it does and moving a bar per sampler step (a sampler can take minutes)."""
        with tqdm(total=steps, desc=f"dry run: {what}", unit="step", leave=False, disable=not cfg.progress or not stderr_is_terminal()) as bar:
            return work.sample(n, progress=lambda: bar.update(1))

    flops_sample, one = count_flops(lambda: sample(1, "FLOPs of one pool sample"))
    flops_clo = count_flops(lambda: work.optimize(one, 1))[0] if cfg.clo_iters else 0
    # chunks as the run fills them: a group's pools and selected latents share chunks; on a CPU, whose throughput
    # hardly depends on the batch, a smaller chunk bounds the dry run's own time
    cap = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, CPU_TIMED_CHUNK)
    b_pool = min(len(groups[0]) * pool, cap)
    b_clo = min(len(groups[0]) * ipc, cap)       # <= b_pool: ipc <= pool
    # the first call at a chunk size pays compilation (torch.compile, CUDA graphs) and autotuning once per rank
    first_pool = timed(lambda: sample(b_pool, f"first pool chunk of {b_pool} (untimed)"), device)[0]
    t_pool, pooled = timed(lambda: sample(b_pool, f"timing a pool chunk of {b_pool}"), device)
    t_sample = t_pool / b_pool
    t_clo, warmup = 0.0, max(first_pool - t_pool, 0.0)
    if cfg.clo_iters:
        first_clo = timed(lambda: work.optimize(pooled[:b_clo], 1), device)[0]
        t_clo = timed(lambda: work.optimize(pooled[:b_clo], 2), device)[0] / (2 * b_clo)
        warmup += max(first_clo - t_clo * b_clo, 0.0)

    lines = [f"dry run: {len(space.ids)} classes of {space.name} on {ranks} rank(s); IPC {ipc}, pool {pool} per "
             f"class, CLO {cfg.clo_iters} iterations, batch size {cfg.batch_size}; nothing is written",
             f"generator {gen.name}: {params:,} parameters (all its modules, VAE included); latent "
             f"{tuple(spec.shape)}",
             f"per class: sample {pool}, select {ipc}, CLO {ipc} latents x {cfg.clo_iters} iterations = "
             f"{ipc * cfg.clo_iters} forward/backward passes, decode {ipc}",
             f"work units: {len(groups)} group(s) of up to {len(groups[0])} classes sharing chunks of "
             f"{cfg.batch_size} ({chunks(len(groups[0]) * pool, cfg.batch_size)} pool chunk(s), "
             f"{chunks(len(groups[0]) * ipc, cfg.batch_size)} CLO chunk(s) per iteration in the first group); "
             f"ranks take whole groups" + (f" ({ranks - len(groups)} rank(s) idle: lower --batch-size)"
                                          if len(groups) < ranks else ""),
             f"FLOPs (torch FLOP counter): {flops_sample / 1e9:.3g} GFLOP per pool sample, "
             f"{flops_clo / 1e9:.3g} GFLOP per CLO latent-iteration (forward + backward + Adam)",
             f"measured on {device} at batch {b_pool}/{b_clo}: {1 / t_sample:.3g} pool samples/s"
             + (f", {1 / t_clo:.3g} CLO latent-iterations/s" if cfg.clo_iters else "")
             + f"; first call at these sizes {_fmt_time(warmup)} slower (compilation, autotuning: once per rank, "
               "in the projection)",
             "", "| rank | classes | pool samples | CLO passes | TFLOP | projected time |", "|---|---|---|---|---|---|"]
    for r, mine in enumerate(per_rank):
        n = len(mine)
        flops = n * (pool * flops_sample + ipc * cfg.clo_iters * flops_clo)
        secs = n * (pool * t_sample + ipc * cfg.clo_iters * t_clo) + (warmup if n else 0.0)
        shown = ", ".join(space.ids[p] for p in mine[:3]) + (", ..." if n > 3 else "")
        lines.append(f"| {r} | {n} ({shown}) | {n * pool} | {n * ipc * cfg.clo_iters} | {flops / 1e12:.3g} | "
                     f"{_fmt_time(secs)} |")
    return "\n".join(lines)


class Workload:
    """One class's pool sampling, CLO, decoding and scoring at a chosen batch size: what the dry run times and
    ``--batch-size auto`` measures."""

    def __init__(self, cfg, gen, handle, space, settings, device, classifier=None):
        self.cfg, self.gen, self.handle, self.settings, self.device = cfg, gen, handle, settings, device
        self.classifier = classifier
        self.label = space.generator_labels[0]
        self.condition = "null" if cfg.condition == "auto" else cfg.condition

    def sample(self, n: int, progress=None) -> torch.Tensor:
        return self.gen.sample(handle=self.handle, labels=torch.full((n,), self.label, device=self.device),
                               generators=unit_generators(self.cfg.seed, self.label, range(n), "sample"),
                               snapshot_steps=[], progress=progress).latents

    def optimize(self, latents: torch.Tensor, iters: int) -> torch.Tensor:
        n = len(latents)
        return clo.optimize(self.gen, self.handle, latents, torch.full((n,), self.label, device=self.device),
                            [self.condition] * n, unit_generators(self.cfg.seed, self.label, range(n), "clo-noise"),
                            unit_generators(self.cfg.seed, self.label, range(n), "clo-level"),
                            replace(self.settings, iters=iters))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.gen.decode(handle=self.handle, latents=latents)

    def classify(self, latents: torch.Tensor) -> torch.Tensor:
        return self.classifier.probs(self.decode(latents))


def _modules(handle) -> list[torch.nn.Module]:
    """The generator's torch modules, found on its handle (whatever the plugin calls them)."""
    values = vars(handle).values() if hasattr(handle, "__dict__") else []
    return [v for v in values if isinstance(v, torch.nn.Module)]
