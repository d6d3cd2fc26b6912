"""Train the MAR generator of the embedded MNIST world on the CPU, reproducibly.

Reproduce the shipped weights (from the repository root, one CPU thread):

    PYTHONPATH=. python scripts/train_mnist_mar.py            # --seed 0, all defaults

It writes ``plugins/mar/worlds/mnist/`` (under ``--out-root``, default: the repository root):

    vae.safetensors     KL autoencoder in the LDM layout (1 channel, 32 px -> 4x8x8): the DiT world's VAE
                        converted key by key (same weights, so both worlds share one latent space)
    mar.safetensors     the MAR's EMA weights (preset ``mnist_small``: 16 tokens of 16 dims, 3+3 blocks of width
                        128, DiffLoss 3x128 with learned-range variance), the best EMA by a fixed-seed judge eval
    cao2.json           the configs of both and the sampling defaults (guidance, schedule, K, head steps)

Recipe (embedded-world notes, sections 4-6): scaled latents of 20k train images (a fresh posterior sample per
batch); one mask ratio per batch from a truncated normal with mean 1, sd 0.5 on [0.1, 1] (wider than MAR's
[0.7, 1] so that cosine sampling with K=8 over 16 tokens stays inside the training range), a random order
per sample; DiffLoss eps-MSE + variational-bound term on the masked tokens only (diffusion_batch_mul 1, t
uniform on 0..999 per token); 10% of labels replaced by the learned fake_latent; AdamW lr 1e-3 (betas 0.9/0.95,
wd 0.02), 200 warmup steps then cosine decay to 1e-4 over 1600 steps, batch 128, grad clip 1.0, EMA 0.999 with
(1+s)/(10+s) warmup. Sampling (evals and the shipped defaults) clips the head's predicted x0 to the largest
|latent| of the training data, rounded up: without it the first steps of the cosine schedule (1/sqrt(alpha-bar)
~ 2e4 at t = 999) amplify this small head's eps errors until the latents explode (judge accuracy 50-64%
without, 99% with, on the same weights).

Every draw comes from ``torch.Generator`` objects seeded from ``--seed``; weight init uses the global RNG,
seeded first. Runtime: see the log line ``train``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import replace

import torch
from safetensors.torch import load_file, save_file

from cao2_mar.diffusion import GaussianDiffusion
from cao2_mar.masking import mask_from_orders, num_masked, random_orders, truncated_normal_ratio
from cao2_mar.model import MAR, PRESETS
from cao2_mar.sampling import sample
from cao2_mar.vae import MNIST_SMALL, AutoencoderKL
from cao2core.data.classifiers import load_classifier
from cao2core.data.labels import label_space
from cao2core.data.mnist import load_split

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIT_VAE = os.path.join("plugins", "dit", "worlds", "mnist", "vae")
WORLD = os.path.join("plugins", "mar", "worlds", "mnist")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def diffusers_vae_to_ldm(sd: dict, levels: int) -> dict:
    """Rename a diffusers ``AutoencoderKL`` state dict (mid-block attention only) to the LDM layout."""
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in k:
            k = k.replace("mid_block.attentions.0", "mid.attn_1")
            for a, b in attn.items():
                k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            if value.ndim == 2:
                value = value[:, :, None, None]
        parts = k.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            rest = ".".join(parts[3:]).replace("resnets.", "block.").replace("downsamplers.0", "downsample")
            k = f"{parts[0]}.down.{i}.{rest}"
        elif parts[1] == "up_blocks":
            i = levels - 1 - int(parts[2])
            rest = ".".join(parts[3:]).replace("resnets.", "block.").replace("upsamplers.0", "upsample")
            k = f"{parts[0]}.up.{i}.{rest}"
        out[k] = value.contiguous()
    return out


def load_world_vae(out_root: str) -> AutoencoderKL:
    cfg = json.loads(open(os.path.join(REPO_ROOT, DIT_VAE, "config.json")).read())
    vcfg = replace(MNIST_SMALL, scale_factor=float(cfg["scaling_factor"]), shift_factor=float(cfg["shift_factor"]))
    sd = load_file(os.path.join(REPO_ROOT, DIT_VAE, "diffusion_pytorch_model.safetensors"))
    vae = AutoencoderKL(vcfg)
    vae.load_state_dict(diffusers_vae_to_ldm(sd, len(vcfg.ch_mult)), strict=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def check_vae_matches_diffusers(vae: AutoencoderKL, x: torch.Tensor) -> float:
    from diffusers import AutoencoderKL as DiffusersKL
    ref = DiffusersKL.from_pretrained(os.path.join(REPO_ROOT, DIT_VAE)).eval()
    mean, _ = vae.moments(x)
    ref_mean = ref.encode(x).latent_dist.mean
    err = max((mean - ref_mean).abs().max().item(), (vae.decode(mean) - ref.decode(ref_mean).sample).abs().max().item())
    return err


@torch.no_grad()
def judge_accuracy(model, vae, judge, diffusion, seed: int, per_class: int, guidance: float, steps: int,
                   clip_x0: float, cfg_schedule: str = "constant", temperature: float = 1.0) -> float:
    labels = torch.arange(10).repeat_interleave(per_class)
    gens = [torch.Generator().manual_seed(seed * 100003 + i) for i in range(len(labels))]
    correct = 0
    for i in range(0, len(labels), 100):
        lat, _ = sample(model, labels[i:i + 100], gens[i:i + 100], steps=steps, guidance=guidance,
                        cfg_schedule=cfg_schedule, temperature=temperature, diffusion=diffusion, clip_x0=clip_x0)
        correct += (judge.probs(vae.decode_scaled(lat)).argmax(1) == labels[i:i + 100]).sum().item()
    return correct / len(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--images", type=int, default=20000, help="train images encoded for the MAR")
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--eval-from", type=int, default=800)
    p.add_argument("--eval-per-class", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sample-steps", type=int, default=8)
    p.add_argument("--diffloss-steps", type=int, default=50)
    p.add_argument("--out-root", default=REPO_ROOT)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.time()

    vae = load_world_vae(args.out_root)
    xtr, ytr = load_split("train")
    xtr, ytr = xtr[:args.images], ytr[:args.images]
    log(f"VAE converted from the DiT world; max |diff| vs diffusers {check_vae_matches_diffusers(vae, xtr[:16]):.2e}")
    t0 = time.time()
    with torch.no_grad():
        moments = [vae.moments(xtr[i:i + 500]) for i in range(0, len(xtr), 500)]
    mean, std = torch.cat([m for m, _ in moments]), torch.cat([s for _, s in moments])
    clip_x0 = float(math.ceil(((mean - vae.cfg.shift_factor) * vae.cfg.scale_factor).abs().max().item()))
    log(f"encoded {len(xtr)} images in {time.time() - t0:.0f} s; sampling clips predicted x0 to +-{clip_x0:g}")

    cfg = PRESETS["mnist_small"]
    torch.manual_seed(args.seed)
    model = MAR(cfg)
    model.init_weights()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    log(f"MAR {sum(p.numel() for p in model.parameters()):,} params, {cfg.seq_len} tokens of {cfg.token_dim} dims")
    decay, no_decay = [], []
    for n, prm in model.named_parameters():
        (no_decay if prm.ndim < 2 or "pos_embed" in n or n in ("fake_latent", "mask_token") else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    diffusion = GaussianDiffusion.training()
    sampler_diffusion = GaussianDiffusion.respaced(args.diffloss_steps)
    judge = load_classifier(None, label_space("mnist"), torch.device("cpu"))
    g = torch.Generator().manual_seed(args.seed + 1)
    order_gen = [torch.Generator().manual_seed(args.seed + 2)]
    L, D = cfg.seq_len, cfg.token_dim
    best, best_acc, history, run_loss, t_train = None, -1.0, [], 0.0, time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * step / args.warmup if step <= args.warmup else (
            args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * (step - args.warmup)
                                                                         / (args.steps - args.warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        idx = torch.randint(0, len(xtr), (args.batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        tokens = model.patchify((z - vae.cfg.shift_factor) * vae.cfg.scale_factor)
        ratio = truncated_normal_ratio(torch.rand(1, generator=g).item(), cfg.mask_ratio_min, 1.0, 1.0,
                                       cfg.mask_ratio_std)
        orders = random_orders(order_gen * args.batch, L)
        mask = mask_from_orders(orders, max(1, num_masked(L, ratio)))
        drop = torch.rand(args.batch, generator=g) < cfg.label_drop_prob
        kinds = ["null" if d else "class" for d in drop.tolist()]
        zc = model.forward_mae(tokens, mask, model.condition_embedding(ytr[idx], kinds))
        x0, zc = tokens[mask], zc[mask]                           # the head sees the masked tokens only
        t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = diffusion.q_sample(x0, t, noise)
        out = model.diffloss.net(x_t, t, zc)
        loss = ((out[:, :D] - noise) ** 2).mean(-1).mean() + diffusion.vb_terms(out, x0, x_t, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rate = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - rate)
        run_loss += loss.item()
        if step % 100 == 0:
            log(f"step {step} loss {run_loss / 100:.4f} lr {lr:.2e} ({(time.time() - t_train) / step:.3f} s/step)")
            run_loss = 0.0
        if (step >= args.eval_from and step % args.eval_every == 0) or step == args.steps:
            t1 = time.time()
            acc = judge_accuracy(ema, vae, judge, sampler_diffusion, 0, args.eval_per_class, args.guidance,
                                 args.sample_steps, clip_x0)
            history.append({"step": step, "acc": acc})
            log(f"eval step {step}: judge acc {acc:.3f} (seed 0, {time.time() - t1:.0f} s)")
            if acc > best_acc:
                best_acc, best = acc, {k: v.detach().clone() for k, v in ema.state_dict().items()}
    train_s = time.time() - t_train
    log(f"train {train_s:.0f} s; best fixed-seed acc {best_acc:.3f}")

    world = os.path.join(args.out_root, WORLD)
    os.makedirs(world, exist_ok=True)
    save_file({k: v.contiguous() for k, v in best.items()}, os.path.join(world, "mar.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, os.path.join(world, "vae.safetensors"))
    defaults = {"label_space": "mnist", "mar": cfg.to_dict(), "vae": vae.cfg.to_dict(), "guidance": args.guidance,
                "cfg_schedule": "constant", "sample_steps": args.sample_steps, "diffloss_steps": args.diffloss_steps,
                "temperature": 1.0, "clip_x0": clip_x0,
                "training": {"seed": args.seed, "steps": args.steps, "images": args.images, "train_seconds":
                             round(train_s), "evals_seed0": history, "threads": args.threads}}
    with open(os.path.join(world, "cao2.json"), "w") as fh:
        json.dump(defaults, fh, indent=1)
    ema.load_state_dict(best)
    fresh = judge_accuracy(ema, vae, judge, sampler_diffusion, 1, args.eval_per_class, args.guidance,
                           args.sample_steps, clip_x0)
    log(f"fresh-seed judge acc of the shipped EMA: {fresh:.3f}; total {time.time() - t_all:.0f} s; wrote {world}")


if __name__ == "__main__":
    main()
