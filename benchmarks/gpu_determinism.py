"""How far a run's output moves with its circumstances on this device: the GPU tolerance of "the same output".

Runs ``cao2 run`` on the embedded MNIST world several ways and compares every class's latents (after CLO) with
the first run's: the same command again (on a GPU, a resumed run recomputes its groups exactly so), another
``--batch-size`` (other chunks), and the CPU. On a CPU the first comparison is 0 by construction; on a GPU
it measures the run-to-run nondeterminism of its kernels (e.g. attention backward). Prints a table and, last,
``tolerance: same command X, other batch size Y, CPU vs this device Z`` (max |difference| of the latents,
whose values are O(1)).

    python benchmarks/gpu_determinism.py            # on the GPU if there is one
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def run(out: Path, device: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "cao2core.cli", "run", "--classes", ARGS.classes, "--ipc", str(ARGS.ipc),
           "--clo-iters", str(ARGS.iters), "--device", device, "--out", str(out), "--no-progress", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def latents(out: Path) -> dict[str, torch.Tensor]:
    return {p.stem: load_file(str(p))["latents"] for p in sorted((out / "latents").glob("*.safetensors"))}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), "the runs wrote different classes"
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", default="0-9")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--other-batch-size", type=int, default=3)
    ARGS = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bs = ["--batch-size", str(ARGS.batch_size)]
        run(tmp / "first", device, *bs)
        run(tmp / "again", device, *bs)
        run(tmp / "batch", device, "--batch-size", str(ARGS.other_batch_size))
        run(tmp / "cpu", "cpu", *bs)
        ref = latents(tmp / "first")
        rows = {"same command again": max_diff(ref, latents(tmp / "again")),
                f"--batch-size {ARGS.other_batch_size} instead of {ARGS.batch_size}": max_diff(ref, latents(tmp / "batch")),
                f"CPU instead of {name}": max_diff(ref, latents(tmp / "cpu"))}
        scale = max(v.abs().max().item() for v in ref.values())
    print(f"device: {name}; MNIST world, classes {ARGS.classes}, IPC {ARGS.ipc}, {ARGS.iters} CLO iterations; "
          f"latents up to {scale:.3g} in magnitude")
    print("| compared with the first run | max abs difference of the latents |\n|---|---|")
    for what, d in rows.items():
        print(f"| {what} | {d:.3g} |")
    same, batch, cpu = rows.values()
    print(f"tolerance: same command {same:.3g}, other batch size {batch:.3g}, CPU vs this device {cpu:.3g}")


if __name__ == "__main__":
    main()
