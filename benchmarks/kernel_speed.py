"""Fused CLO kernels against plain torch, at CLO shapes (B = 64 and 256; latents 4x32x32 (DiT) and 16x16x16 (MAR)).

CPU: the C++ loss (forward + backward) against eager torch (the reference) and torch.compile of the reference, and
the C++ Adam step against torch.optim.Adam (single-tensor, foreach and fused). With a GPU: the CUDA and Triton
kernels against eager and torch.compile, checked against the reference first, with the achieved bandwidth next to a
measured device copy bandwidth. Every number is the median of repeated runs in this one process. The last line is
``cpp_loss_speedup_vs_eager: X`` (B=64, 4x32x32).

    python benchmarks/kernel_speed.py [--repeats 50] [--no-compile] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cao2core import kernels as K
from cao2core.kernels import reference

SHAPES = [(64, (4, 32, 32)), (256, (4, 32, 32)), (64, (16, 16, 16)), (256, (16, 16, 16))]
LAM = 10.0


def median_ms(fn, repeats: int, warmup: int = 3, sync=None) -> float:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def loss_step(loss_fn, p, t):
    def run():
        loss_fn(p, t).sum().backward()
        p.grad = None
    return run


def check_loss(backend, p, t):
    a, b = p.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    la, lb = K.clo_loss(a, t, LAM, backend=backend), reference.clo_loss(b, t, LAM)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def adam_runner(kind, z0, grad, backend=None):
    z = z0.clone().requires_grad_()
    z.grad = grad
    if kind == "latent":
        opt = K.LatentAdam([z], lr=6e-4, backend=backend)
    else:
        opt = torch.optim.Adam([z], lr=6e-4, **{"single": dict(foreach=False), "foreach": dict(foreach=True),
                                               "fused": dict(fused=True)}[kind])
    return opt.step


def check_adam(backend, z0, grad):
    a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    oa, ob = K.LatentAdam([a], lr=6e-4, backend=backend), torch.optim.Adam([b], lr=6e-4)
    for _ in range(3):
        a.grad, b.grad = grad, grad
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    print(fmt.format(*header))
    print(fmt.format(*["-" * w for w in widths]))
    for r in rows:
        print(fmt.format(*r))


def cpu_bench(args) -> float:
    torch.manual_seed(0)
    K.resolve("cpp", "cpu")  # builds / loads the C++ ops before anything is timed
    compiled = None
    if not args.no_compile:
        compiled = torch.compile(reference.clo_loss)
    rows, speedup = [], None
    for B, lat in SHAPES:
        p = torch.randn(B, *lat, requires_grad=True)
        t = torch.randn(B, *lat)
        check_loss("cpp", p, t)
        name = f"{lat[0]}x{lat[1]}x{lat[2]}"
        eager = median_ms(loss_step(lambda a, b: reference.clo_loss(a, b, LAM), p, t), args.repeats)
        cpp = median_ms(loss_step(lambda a, b: K.clo_loss(a, b, LAM, backend="cpp"), p, t), args.repeats)
        rows.append(("loss fwd+bwd", B, name, "torch eager (reference)", f"{eager:.3f}", "1.00"))
        if compiled is not None:
            t0 = time.perf_counter()
            loss_step(lambda a, b: compiled(a, b, LAM), p, t)()
            ctime = time.perf_counter() - t0
            comp = median_ms(loss_step(lambda a, b: compiled(a, b, LAM), p, t), args.repeats)
            rows.append(("loss fwd+bwd", B, name, f"torch.compile (compile {ctime:.0f} s)", f"{comp:.3f}",
                         f"{eager / comp:.2f}"))
        rows.append(("loss fwd+bwd", B, name, "cpp fused", f"{cpp:.3f}", f"{eager / cpp:.2f}"))
        if compiled is not None:
            rows[-1] = rows[-1][:5] + (f"{eager / cpp:.2f} ({comp / cpp:.2f} vs compile)",)
        if B == 64 and lat == (4, 32, 32):
            speedup = eager / cpp
    for B, lat in SHAPES:
        z0, grad = torch.randn(B, *lat), torch.randn(B, *lat)
        check_adam("cpp", z0, grad)
        name = f"{lat[0]}x{lat[1]}x{lat[2]}"
        base = median_ms(adam_runner("foreach", z0, grad), args.repeats)
        for label, kind in (("torch.optim.Adam foreach", "foreach"), ("torch.optim.Adam single-tensor", "single"),
                            ("torch.optim.Adam fused", "fused")):
            ms = base if kind == "foreach" else median_ms(adam_runner(kind, z0, grad), args.repeats)
            rows.append(("adam step", B, name, label, f"{ms:.3f}", f"{base / ms:.2f}"))
        ms = median_ms(adam_runner("latent", z0, grad, "cpp"), args.repeats)
        rows.append(("adam step", B, name, "cpp LatentAdam", f"{ms:.3f}", f"{base / ms:.2f}"))
    print(f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} runs; "
          "speedup = baseline ms / ms (loss: eager reference; adam: foreach)")
    table(rows, ("op", "B", "latent", "implementation", "ms", "speedup"))
    return speedup


def gpu_bench(args) -> None:
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    big = torch.empty(256 * 2**20 // 4, device=dev)
    dst = torch.empty_like(big)
    copy_ms = median_ms(lambda: dst.copy_(big), 20, sync=sync)
    copy_bw = 2 * big.numel() * 4 / (copy_ms * 1e-3) / 1e9
    del big, dst
    backends = [b for b in ("cuda", "triton") if _usable(b, dev)]
    compiled = None if args.no_compile else torch.compile(reference.clo_loss)
    rows = []
    for B, lat in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            p = torch.randn(B, *lat, device=dev, dtype=dtype, requires_grad=True)
            t = torch.randn(B, *lat, device=dev, dtype=dtype)
            for be in backends:
                check_loss(be, p, t)
            name = f"{lat[0]}x{lat[1]}x{lat[2]} {str(dtype).split('.')[-1]}"
            nbytes = 5 * p.numel() * p.element_size()   # forward reads pred+target, backward reads both, writes grad
            eager = median_ms(loss_step(lambda a, b: reference.clo_loss(a, b, LAM), p, t), args.repeats, sync=sync)
            rows.append(("loss fwd+bwd", B, name, "torch eager", f"{eager:.4f}", "1.00", ""))
            impls = []
            if compiled is not None:
                impls.append(("torch.compile", lambda a, b: compiled(a, b, LAM)))
            impls += [(be, (lambda be: lambda a, b: K.clo_loss(a, b, LAM, backend=be))(be)) for be in backends]
            for label, fn in impls:
                ms = median_ms(loss_step(fn, p, t), args.repeats, sync=sync)
                bw = nbytes / (ms * 1e-3) / 1e9
                rows.append(("loss fwd+bwd", B, name, label, f"{ms:.4f}", f"{eager / ms:.2f}",
                             f"{bw:.0f} GB/s ({100 * bw / copy_bw:.0f}%)"))
    for B, lat in SHAPES:
        z0, grad = torch.randn(B, *lat, device=dev), torch.randn(B, *lat, device=dev)
        for be in backends:
            check_adam(be, z0, grad)
        name = f"{lat[0]}x{lat[1]}x{lat[2]}"
        nbytes = 7 * z0.numel() * 4
        base = median_ms(adam_runner("foreach", z0, grad), args.repeats, sync=sync)
        rows.append(("adam step", B, name, "torch.optim.Adam foreach", f"{base:.4f}", "1.00", ""))
        for label, run in [("torch.optim.Adam fused", adam_runner("fused", z0, grad))] + \
                          [(f"{be} LatentAdam", adam_runner("latent", z0, grad, be)) for be in backends]:
            ms = median_ms(run, args.repeats, sync=sync)
            bw = nbytes / (ms * 1e-3) / 1e9
            rows.append(("adam step", B, name, label, f"{ms:.4f}", f"{base / ms:.2f}",
                         f"{bw:.0f} GB/s ({100 * bw / copy_bw:.0f}%)"))
    print(f"\nGPU: {torch.cuda.get_device_name(dev)}; copy bandwidth {copy_bw:.0f} GB/s (read+write of 256 MiB); "
          f"median of {args.repeats} runs, wall time per call including launches")
    table(rows, ("op", "B", "latent", "implementation", "ms", "speedup", "bandwidth"))


def _usable(be, dev):
    try:
        K.resolve(be, dev)
        return True
    except K.KernelUnavailable as exc:
        print(f"[{be} skipped: {exc}]")
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (tens of seconds per shape)")
    ap.add_argument("--no-gpu", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    speedup = cpu_bench(args)
    if torch.cuda.is_available() and not args.no_gpu:
        gpu_bench(args)
    print(f"cpp_loss_speedup_vs_eager: {speedup:.2f}")


if __name__ == "__main__":
    main()
