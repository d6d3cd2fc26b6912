"""Throughput of pool sampling and CLO for generator-sized models with random weights (no checkpoint needed).

For each model: pool samples per second and CLO latent-iterations per second, batched (cao2: one chunk, frozen
generator, fused kernels, at ``--precision``) against one image at a time as the official code does (batch 1,
fresh Adam per image, generator weights left trainable, fp32), measured in the same run on the same device;
plus the share of the device's peak dense bf16 matrix rate the batched CLO reaches (model FLOPs from torch's
FLOP counter / time / peak), the speedups (``<model> clo speedup: X``) and, last, the time ImageNet-1K IPC 10
would take at the batched rates (the preset's pool and sampler steps, 100 CLO iterations; scoring and decoding
left out), printed with the model behind it and its inputs. Model sizes matter here; with the small CPU presets
the projection is only arithmetic.

The projection scales each part of sampling by its own count. DiT and SiT run the transformer once per sampler
step, so their time scales with the preset's steps / the steps timed. MAR does not: its transformer runs once
per AR step, but its DiffLoss head denoises every token for ``diffloss_steps`` steps whatever the AR step count
(the AR steps only split the tokens into groups). The batched MAR sample is run once more with the transformer
and the head timed apart; the transformer's share scales with the AR steps, the head's with the DiffLoss steps,
and the rest (noise draws and the diffusion update, one round per AR step and DiffLoss step) with both. The
head's time is FLOP-bound only while its calls are large: fewer tokens per call (more AR steps, small batches,
small models) leave it bound by the number of calls (AR steps x DiffLoss steps). So its part of the projection
comes from one AR step's worth of head calls timed at the preset's AR steps (the batch x the tokens one of its
steps denoises, ``diffloss_steps`` calls), times the preset's AR steps.

The random-weight MAR is written to a temporary folder to be loaded through the plugin (about 1.1 GB for
MAR-B); the folder is removed when the script ends, also on an error or Ctrl-C.

``--precision`` of the batched runs: ``autocast`` (GPU default): fp32 weights, the generator's forward under
bf16 autocast, fp32 latents and Adam state; ``weights``: bf16 weights (``--dtype bf16``; MAR casts no weights
and reads it as bf16 autocast); ``fp32`` (CPU default).

``--compile MODE`` runs the batched sampling and CLO through ``torch.compile`` as ``--gen-opt compile`` does
(DiT: the transformer; MAR: its block stacks and DiffLoss head), after an untimed warm-up at the batch size, so
compilation is not timed; FLOPs are counted on the eager modules.

    python benchmarks/throughput.py                              # CPU: small models, a few images
    python benchmarks/throughput.py --models dit-xl mar-b --images 32 --iters 20 --sample-steps 50  # one GPU
    python benchmarks/throughput.py --models dit-xl sit-xl --images 32 --iters 20 --sample-steps 50  # DiT vs SiT

``sit-xl`` is SiT-XL/2 as the sit generator runs it (SiT's SDE, CFG 1.5 on 3 channels, velocity CLO); its
ImageNet-1K projection scales the timed steps to the in1k-sit preset's 250.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).parent))
from clo_batching import official_style  # noqa: E402  (the one-image-at-a-time reference loop)

from cao2core.method import clo
from cao2core.generators import compiling
from cao2core import kernels# noqa: E402
from cao2core.method.dryrun import count_flops, timed# noqa: E402
from cao2core.generators.host import Host# noqa: E402
from cao2core.generators.seeding import unit_generators# noqa: E402

# dense bf16 tensor-core peak (FLOP/s, no sparsity) by device-name fragment
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}

DIT = dict(in_channels=4, out_channels=8, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
DIT_SIZES = {"dit-xl": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),   # 675M, DiT-XL/2
             "dit-b": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
             "dit-s": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64)}

PRECISION_TEXT = {"autocast": "fp32 weights and latents, bf16 autocast forward/backward",
                  "weights": "bf16 weights, fp32 latents", "fp32": "fp32 throughout"}
PRECISIONS = tuple(PRECISION_TEXT)


def build_dit(name: str, device: torch.device, precision: str, steps: int, scratch: Path):
    from diffusers import DiTTransformer2DModel

    import cao2_dit
    from cao2_dit import sampling
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "weights" else torch.float32
    transformer = DiTTransformer2DModel(**DIT, **DIT_SIZES[name]).eval().requires_grad_(False).to(device, dtype)
    handle = cao2_dit.DiTHandle(transformer=transformer, vae=None,
                                alphas_cumprod=sampling.alphas_cumprod().to(device),
                                label_space="in1k", guidance=4.0, steps=steps, sampler="ddpm", convention="default",
                                dtype=dtype, autocast=torch.bfloat16 if precision == "autocast" else None)
    return Host().generator("dit"), handle, transformer


# MAR-B as published (256 px, 256 tokens); mar-s: a CPU-sized MAR (128 px, 64 tokens, width 256)
MAR_SIZES = {"mar-b": ("mar_base", {}),
             "mar-s": ("mar_base", dict(img_size=128, encoder_embed_dim=256, encoder_depth=2, encoder_num_heads=4,
                                         decoder_embed_dim=256, decoder_depth=2, decoder_num_heads=4, diffloss_d=2,
                                         diffloss_w=256))}


def build_mar(name: str, device: torch.device, precision: str, steps: int, scratch: Path):
    """A random-weight MAR world written to a folder in ``scratch`` and loaded through the plugin."""
    import json
    from dataclasses import replace as dc_replace

    from safetensors.torch import save_file

    from cao2_mar.model import MAR, preset
    from cao2_mar.vae import KL16, AutoencoderKL
    base, overrides = MAR_SIZES[name]
    cfg = preset(base, **overrides)
    vcfg = dc_replace(KL16, resolution=cfg.img_size)
    torch.manual_seed(0)
    model = MAR(cfg)
    model.init_weights()
    folder = scratch / name
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "mar.safetensors"))
    save_file(AutoencoderKL(vcfg).state_dict(), str(folder / "vae.safetensors"))
    (folder / "cao2.json").write_text(json.dumps({"label_space": "in1k", "mar": cfg.to_dict(), "vae": vcfg.to_dict(),
                                                  "guidance": 2.9, "cfg_schedule": "linear", "sample_steps": steps,
                                                  "diffloss_steps": MAR_DIFFLOSS_STEPS, "temperature": 1.0}))
    gen = Host().generator("mar")
    precision_opts = {"autocast": {"autocast": "bf16"}, "weights": {"dtype": "bf16"}, "fp32": {"autocast": "none"}}
    handle = gen.load(options={"model": str(folder), **precision_opts[precision]}, device=device)
    return gen, handle, handle.model


# SiT-XL/2 (675M, the same backbone as dit-xl) and SiT-S/2, 256 px, learned-sigma output as SiT-XL-2-256.pt
SIT_SIZES = {"sit-xl": dict(depth=28, hidden_size=1152, num_heads=16),
             "sit-s": dict(depth=12, hidden_size=384, num_heads=6)}


def build_sit(name: str, device: torch.device, precision: str, steps: int, scratch: Path):
    """A random-weight SiT handle with the in1k-sit preset's sampler (SDE, CFG 1.5 on 3 channels)."""
    import cao2_sit
    from cao2_sit import paths, sampling
    from cao2_sit.model import SiT, SiTConfig
    torch.manual_seed(0)
    size = SIT_SIZES[name]
    cfg = SiTConfig(input_size=32, patch_size=2, in_channels=4, num_classes=1000, learn_sigma=True,
                    mlp_hidden=4 * size["hidden_size"], **size)
    dtype = torch.bfloat16 if precision == "weights" else torch.float32
    model = SiT(cfg).eval().requires_grad_(False).to(device, dtype)
    path = paths.Path("sit", "linear")
    settings = sampling.SamplerSettings(family="sit", sampler="sde", steps=steps, guidance=1.5, null_label=1000,
                                        path=path, cfg_channels=3)
    handle = cao2_sit.SiTHandle(transformer=model, vae=None, family="sit", settings=settings,
                                level_t=paths.level_times(path, "dit").to(device), clo_times="dit", dtype=dtype,
                                autocast=torch.bfloat16 if precision == "autocast" else None)
    return Host().generator("sit"), handle, model


BUILDERS = {**{k: build_dit for k in DIT_SIZES}, **{k: build_mar for k in MAR_SIZES},
            **{k: build_sit for k in SIT_SIZES}}
# ImageNet-1K IPC 10 as the presets run it: (pool factor, sampler or AR steps) of in1k-dit, in1k-mar and in1k-sit
IN1K_WORK = {"dit": (4, 50), "mar": (2, 32), "sit": (4, 250)}
MAR_DIFFLOSS_STEPS = 100        # in1k-mar's DiffLoss steps (the mar plugin's default), also the ones timed
IN1K_CLASSES, IN1K_IPC, IN1K_CLO_ITERS = 1000, 10, 100


def sampling_seconds(row: dict, steps: int, diffloss_steps: int) -> float:
    """Seconds to sample one batch of ``row["images"]`` with ``steps`` sampler (DiT, SiT) or AR (MAR) steps and
    MAR's ``diffloss_steps``, from the parts of the batch timed (``row["sample_parts"]``, seconds) at
    ``row["steps_timed"]`` and ``row["diffloss_timed"]``: the transformer's by the step ratio, the DiffLoss head's by
    the DiffLoss step ratio (it denoises every token whatever the AR steps), the rest by both."""
    parts = row["sample_parts"]
    k = steps / row["steps_timed"]
    d = diffloss_steps / row["diffloss_timed"]
    head = parts["head"] * d
    if head_round_applies(row, steps):    # the head's calls timed at this step count's shape: one AR step's worth
        head = row["head_round"][1] * steps * d
    return parts["transformer"] * k + head + parts["rest"] * k * d


def head_round_applies(row: dict, steps: int) -> bool:
    """Whether the head's part at ``steps`` AR steps comes from its calls timed at that shape: only where the
    sample itself was timed at other steps (at the same steps the sample's own head time is the measure)."""
    at_steps = (row.get("head_round") or (None,))[0]
    return at_steps == steps != row["steps_timed"]


def in1k_projection(name: str, row: dict) -> dict:
    """ImageNet-1K IPC 10 on one device at the batched rates measured here: the pool sampled with the preset's
    steps, 100 CLO iterations per image (classifier scoring and decoding left out). Seconds by stage, and the
    counts behind them."""
    pool_factor, steps = IN1K_WORK[name.split("-")[0]]
    samples = IN1K_CLASSES * IN1K_IPC * pool_factor
    clo_its = IN1K_CLASSES * IN1K_IPC * IN1K_CLO_ITERS
    batch = sampling_seconds(row, steps, MAR_DIFFLOSS_STEPS if row["head_timed"] else row["diffloss_timed"])
    return {"samples": samples, "steps": steps, "batch_seconds": batch, "sample_s": samples / row["images"] * batch,
            "clo_its": clo_its, "clo_s": clo_its / row["clo_batch"]}


def in1k_hours(name: str, row: dict) -> float:
    p = in1k_projection(name, row)
    return (p["sample_s"] + p["clo_s"]) / 3600


def describe_projection(name: str, row: dict) -> str:
    """The projection's model and inputs, in words."""
    p = in1k_projection(name, row)
    parts = row["sample_parts"]
    if row["head_timed"]:
        timed_text = (f"a batch of {row['images']} at {row['steps_timed']} AR steps, {row['diffloss_timed']} "
                      f"DiffLoss steps: transformer {parts['transformer']:.3g} s, DiffLoss head {parts['head']:.3g} s, "
                      f"rest {parts['rest']:.3g} s; at the preset's {p['steps']} AR steps and {MAR_DIFFLOSS_STEPS} "
                      f"DiffLoss steps: transformer x{p['steps'] / row['steps_timed']:.3g}, rest x"
                      f"{p['steps'] / row['steps_timed'] * MAR_DIFFLOSS_STEPS / row['diffloss_timed']:.3g}, head "
                      + (f"{row['head_round'][1]:.3g} s per AR step timed at the preset's shape x {p['steps']}"
                         if head_round_applies(row, p["steps"])
                         else f"x{MAR_DIFFLOSS_STEPS / row['diffloss_timed']:.3g}"))
    else:
        timed_text = (f"a batch of {row['images']} at {row['steps_timed']} sampler steps: {parts['transformer']:.3g} "
                      f"s, x{p['steps'] / row['steps_timed']:.3g} for the preset's {p['steps']} steps")
    return (f"{name} projection inputs: {timed_text} -> {p['batch_seconds']:.3g} s per batch; {p['samples']} pool "
            f"samples: {p['sample_s'] / 3600:.3g} h; {p['clo_its']} CLO latent-iterations at {row['clo_batch']:.3g}/s: "
            f"{p['clo_s'] / 3600:.3g} h")


def mar_head_round_seconds(handle, images: int, steps: int, device: torch.device) -> float:
    """Seconds of one AR step's DiffLoss head calls when sampling ``images`` at ``steps`` AR steps:
    ``diffloss_steps`` calls on the tokens one step denoises (``seq_len / steps`` per image, doubled under
    guidance), under the sampler's autocast; random inputs, as the head's cost does not depend on their values."""
    from cao2core.generators import precision
    model, cfg = handle.model, handle.model.cfg
    rows = images * math.ceil(cfg.seq_len / steps) * (2 if handle.guidance != 1.0 else 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cfg.token_dim, generator=g).to(device)
    z = torch.randn(rows, cfg.decoder_embed_dim, generator=g).to(device)
    times = torch.linspace(999, 0, handle.diffloss_steps).long().to(device)
    amp = precision.autocast(device, handle.autocast if device.type == "cuda" else None)

    @torch.no_grad()
    def one_round():
        with amp:
            for t in times:
                model.head(x, t.expand(rows), z)
    one_round()                                                         # warm-up (and compilation) at this shape
    return timed(one_round, device)[0]


def mar_sampling_shares(model, run, device: torch.device) -> dict:
    """The shares of one batched MAR sample (``run()``) spent in the transformer (``forward_mae``, once per AR
    step), in the DiffLoss head (``head``) and elsewhere (noise draws, the diffusion update), from one run with
    each call timed apart (the GPU synchronized around it: shares, applied to the clean time, not seconds)."""
    spent = {"transformer": 0.0, "head": 0.0}

    def clocked(fn, key):
        def call(*args, **kwargs):
            seconds, out = timed(lambda: fn(*args, **kwargs), device)
            spent[key] += seconds
            return out
        return call

    compiled_head = model.__dict__.get("head")          # compile_parts sets it on the instance
    model.forward_mae = clocked(model.forward_mae, "transformer")
    model.head = clocked(model.head, "head")
    try:
        total = timed(run, device)[0]
    finally:
        del model.forward_mae
        if compiled_head is None:
            del model.head
        else:
            model.head = compiled_head
    shares = {key: seconds / total for key, seconds in spent.items()}
    shares["rest"] = max(0.0, 1.0 - shares["transformer"] - shares["head"])
    return shares


def peak_bf16(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def set_compiled(handle, mode: str) -> None:
    """``--gen-opt compile=MODE`` on a loaded handle: DiT's compiled transformer, MAR's compiled parts."""
    if hasattr(handle, "compiled"):
        handle.compiled = compiling.compiled(handle.transformer, mode) if mode != "none" else None
    else:
        handle.model.compile_parts(None if mode == "none" else lambda fn: compiling.compiled(fn, mode))
    handle.compile_mode = mode


def bench(name: str, args, device: torch.device, scratch: Path) -> dict:
    gen, handle, model = BUILDERS[name](name, device, args.precision, args.sample_steps, scratch)
    spec = gen.latent_spec(handle=handle)
    label, n = 1, args.images
    idx = list(range(n))
    settings = clo.CLOSettings(iters=args.iters, level_max=spec.default_level_max, level_min=spec.level_range[0],
                               kernels=kernels.resolve("auto", device))

    def sample(ids):
        return gen.sample(handle=handle, labels=torch.full((len(ids),), label, device=device),
                          generators=unit_generators(0, label, ids, "sample"), snapshot_steps=[]).latents.float()

    # pool sampling: one at a time, then one batch
    sample([0])                                                         # warm-up
    t_sample_one = timed(lambda: [sample([i]) for i in idx], device)[0]
    if args.compile != "none":                                          # the batched runs only
        set_compiled(handle, args.compile)
        sample(idx)                                                     # compiles at this batch size
    t_sample_batch, z0 = timed(lambda: sample(idx), device)
    is_mar = hasattr(handle, "diffloss_steps")
    head_round = None
    if is_mar:
        shares = mar_sampling_shares(model, lambda: sample(idx), device)
        preset_steps = IN1K_WORK["mar"][1]
        head_round = (preset_steps, mar_head_round_seconds(handle, n, preset_steps, device))
    else:
        shares = {"transformer": 1.0, "head": 0.0, "rest": 0.0}
    sample_parts = {key: share * t_sample_batch for key, share in shares.items()}

    def ours(iters=args.iters):
        s = replace(settings, iters=iters)
        return clo.optimize(gen, handle, z0, torch.full((n,), label, device=device), ["null"] * n,
                            unit_generators(0, label, idx, "clo-noise"), unit_generators(0, label, idx, "clo-level"), s)

    # warm-up (kernel builds, allocator; compilation, and for MAR its second, dynamic-shape graph)
    ours(1 if args.compile == "none" else 3)
    t_clo_batch = timed(ours, device)[0]
    set_compiled(handle, "none")        # FLOPs (the counter sees no compiled kernels) and the reference: eager
    flops_iter = count_flops(lambda: ours(1))[0]                              # n latents, one iteration

    # the reference: fp32 weights, left trainable, one latent and one fresh Adam at a time
    model.to(torch.float32).requires_grad_(True)
    for attr in ("dtype", "autocast"):         # weight dtype (DiT), autocast (both): the reference runs fp32
        if hasattr(handle, attr):
            setattr(handle, attr, torch.float32 if attr == "dtype" else None)
    t_clo_one = timed(lambda: official_style(gen, handle, z0, label, idx, settings, 0), device)[0]
    model.requires_grad_(False)

    peak = peak_bf16(device)
    achieved = flops_iter * args.iters / t_clo_batch
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "images": n,
            "sample_one": n / t_sample_one, "sample_batch": n / t_sample_batch, "sample_parts": sample_parts,
            "steps_timed": args.sample_steps, "head_timed": is_mar, "head_round": head_round,
            "diffloss_timed": handle.diffloss_steps if is_mar else 1,
            "clo_one": n * args.iters / t_clo_one, "clo_batch": n * args.iters / t_clo_batch,
            "tflops": achieved / 1e12, "peak_share": achieved / peak if peak else None}


def main() -> None:
    diffusers_logging.set_verbosity_error()     # dtype casts of random models are intended here
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    ap.add_argument("--models", nargs="+", choices=tuple(BUILDERS), default=["dit-xl", "mar-b"] if gpu else ["dit-s", "mar-s"])
    ap.add_argument("--images", type=int, default=32 if gpu else 4, help="latents per batch (IPC-sized chunk)")
    ap.add_argument("--iters", type=int, default=20 if gpu else 3, help="CLO iterations timed")
    ap.add_argument("--sample-steps", type=int, default=50 if gpu else 4, help="sampler steps timed")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--precision", choices=PRECISIONS, default="autocast" if gpu else "fp32",
                    help="batched runs: bf16 autocast over fp32 weights and latents, bf16 weights, or fp32 "
                         "(default: autocast on a GPU, fp32 on a CPU)")
    ap.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"),
                    help="torch.compile mode of the batched runs (DiT: the transformer; MAR: its block stacks "
                         "and DiffLoss head)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.images} images per batch, {args.iters} CLO iterations, "
          f"{args.sample_steps} sampler steps; precision {args.precision} ({PRECISION_TEXT[args.precision]}); "
          f"torch.compile {args.compile}")
    # the random-weight MAR's files (1.1 GB for MAR-B) live here; removed on any exit, Ctrl-C included
    with tempfile.TemporaryDirectory(prefix="cao2-bench-") as scratch:
        rows = [bench(m, args, device, Path(scratch)) for m in args.models]
    print()
    print("| model | params | pool samples/s one-at-a-time | batched | CLO latent-it/s one-at-a-time | batched | "
          "CLO TFLOP/s | share of bf16 peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['peak_share']:.1f}%" if r["peak_share"] is not None else "n/a (no GPU peak)"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['sample_one']:.3g} | {r['sample_batch']:.3g} | "
              f"{r['clo_one']:.3g} | {r['clo_batch']:.3g} | {r['tflops']:.3g} | {share} |")
    print()
    for r in rows:
        print(f"{r['model']} sample speedup: {r['sample_batch'] / r['sample_one']:.2f}")
        print(f"{r['model']} clo speedup: {r['clo_batch'] / r['clo_one']:.2f}")
    for r in rows:
        print(describe_projection(r["model"], r))
    for r in rows:
        hours = in1k_hours(r["model"], r)
        print(f"{r['model']} projected ImageNet-1K IPC 10 (preset pool and steps, 100 CLO iterations) on this "
              f"device: {hours:.3g} h ({hours / 8:.3g} h on 8)")


if __name__ == "__main__":
    main()
