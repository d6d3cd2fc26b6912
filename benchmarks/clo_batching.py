"""CLO throughput: one image at a time as the official code does, against cao2's batched CLO, on identical work.

Baseline (the reference's pattern): for each selected latent a fresh Adam, batch 1, and the generator's
weights left trainable, so every backward also computes (and accumulates) weight gradients.
Per class: all IPC latents of a class in one batch, per-sample loss summed, generator frozen.
Ours (what ``cao2 run`` does): the classes' selected latents share chunks of ``--batch-size`` (class groups),
so a small IPC still fills the batch.
All use the same latents, fixed noise and per-iteration timesteps, so they compute the same result; the
script checks that, then prints the time ratio of ours to the baseline as its last line: ``speedup: X``.

    python benchmarks/clo_batching.py                 # embedded MNIST world, 10 classes x IPC 10, 100 iterations
    python benchmarks/clo_batching.py --ipc 1         # IPC 1: per-class batching gains nothing, groups do
"""
from __future__ import annotations

import argparse
import time

import torch

from cao2core.method import clo
from cao2core.generators.host import Host
from cao2core.method.pools import batches
from cao2core.generators.seeding import unit_generator, unit_generators


def official_style(gen, handle, z0, label, idx, settings, seed):
    """One latent at a time, fresh Adam each, weights trainable (their gradients computed and accumulated)."""
    out = []
    for i, j in enumerate(idx):
        noise_g, = unit_generators(seed, label, [j], "clo-noise")
        level_g, = unit_generators(seed, label, [j], "clo-level")
        latent = torch.nn.Parameter(z0[i:i + 1].clone())
        noise = torch.randn(z0.shape[1:], generator=noise_g).unsqueeze(0).to(z0.device)
        opt = torch.optim.Adam([latent], lr=settings.lr)
        for _ in range(settings.iters):
            # rebuilt every iteration, as the reference does (with trainable weights it holds a graph)
            cond = gen.condition(handle=handle, labels=torch.tensor([label], device=z0.device), kinds=["null"])
            t = torch.randint(settings.level_min, settings.level_max + 1, (1,), generator=level_g).to(z0.device)
            p = gen.predict(handle=handle, corrupted=gen.corrupt(handle=handle, latents=latent, levels=t,
                                                                 noise=noise, generators=[noise_g],
                                                                 level_max=settings.level_max), condition=cond)
            e = p.pred - p.target
            loss = e.square().mean() + settings.lam * e.abs().max()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(latent.detach())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="DiT folder (default: the embedded MNIST world)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64, help="chunk of the class-group CLO")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    gen = Host().generator("dit")
    handle = gen.load(options={"model": args.model, "dataset": "mnist"}, device=torch.device("cpu"))
    spec = gen.latent_spec(handle=handle)
    settings = clo.CLOSettings(iters=args.iters, level_max=spec.default_level_max)
    work = [(c, torch.randn((args.ipc, *spec.shape), generator=torch.Generator().manual_seed(c)))
            for c in range(args.classes)]
    idx = list(range(args.ipc))

    t0 = time.perf_counter()
    per_class = [clo.optimize(gen, handle, z0, torch.full((args.ipc,), c), ["null"] * args.ipc,
                              unit_generators(0, c, idx, "clo-noise"), unit_generators(0, c, idx, "clo-level"),
                              settings) for c, z0 in work]
    t_class = time.perf_counter() - t0

    rows = [(c, i) for c, _ in work for i in idx]
    z_all = torch.cat([z0 for _, z0 in work])
    t0 = time.perf_counter()
    grouped = torch.cat([clo.optimize(gen, handle, z_all[chunk], torch.tensor([rows[r][0] for r in chunk]),
                                      ["null"] * len(chunk), [unit_generator(0, *rows[r], "clo-noise") for r in chunk],
                                      [unit_generator(0, *rows[r], "clo-level") for r in chunk], settings)
                         for chunk in batches(range(len(rows)), args.batch_size)])
    t_ours = time.perf_counter() - t0
    ours = list(grouped.split(args.ipc))

    handle.transformer.requires_grad_(True)         # as the reference leaves them
    t0 = time.perf_counter()
    base = [official_style(gen, handle, z0, c, idx, settings, 0) for c, z0 in work]
    t_base = time.perf_counter() - t0
    handle.transformer.requires_grad_(False)

    diff = max(max((a - b).abs().max().item(), (c - b).abs().max().item()) for a, b, c in zip(ours, base, per_class))
    n = args.classes * args.ipc
    print(f"work: {args.classes} classes x IPC {args.ipc} = {n} latents, {args.iters} CLO iterations, "
          f"{sum(p.numel() for p in handle.transformer.parameters()):,} generator parameters, {args.threads} threads")
    print(f"one image at a time (reference pattern): {t_base:8.2f} s  ({n * args.iters / t_base:7.1f} latent-steps/s)")
    print(f"batched per class, frozen generator:     {t_class:8.2f} s  ({n * args.iters / t_class:7.1f} latent-steps/s)"
          f"  x{t_base / t_class:.2f}")
    print(f"class groups, chunks of {args.batch_size:<4d}:          {t_ours:8.2f} s  "
          f"({n * args.iters / t_ours:7.1f} latent-steps/s)  x{t_base / t_ours:.2f}")
    print(f"max |difference| between the results: {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("the methods disagree; the comparison is invalid")
    print(f"speedup: {t_base / t_ours:.2f}")


if __name__ == "__main__":
    main()
