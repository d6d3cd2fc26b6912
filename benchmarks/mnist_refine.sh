#!/usr/bin/env bash
# Plug-and-play on the embedded MNIST world: `cao2 refine` (CLO only: --select none --ipc all) applied to
# (a) a random real subset at IPC 10 (the subset `cao2 eval --random-real 10` draws for repeat 0) and
# (b) the raw DiT pool at IPC 10 (no selection, no CLO). Each set is scored before and after with
# `cao2 eval` (hard labels, ConvNet-3, 3 students). Writes OUT/summary.md.
#
#   bash benchmarks/mnist_refine.sh              # about 15 minutes on 2 idle CPU cores
set -euo pipefail
OUT=${OUT:-out/mnist-refine}
REPEAT=${REPEAT:-3}
CAO2=${CAO2:-.venv/bin/cao2}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

# (a) the random real subset as class folders of PNGs
"$PY" - "$OUT/real-ipc10" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from cao2core import mnist
from cao2core.scoring.data import random_real_indices
root = Path(sys.argv[1])
x, y = mnist.load_split("train")
for i in random_real_indices(y, 10, 10, seed=0, repeat=0).tolist():
    folder = root / str(int(y[i]))
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((x[i, 0] + 1) * 127.5).round().byte().numpy(), "L").save(folder / f"{len(list(folder.iterdir()))}.png")
PY
# (b) the raw DiT pool
"$CAO2" run --select none --clo-iters 0 --ipc 10 --out "$OUT/pool-ipc10" --no-progress

for name in real pool; do
  src="$OUT/$name-ipc10"; images="$src"; [ "$name" = pool ] && images="$src/images"
  "$CAO2" refine --images "$images" --select none --ipc all --out "$OUT/$name-refined" --no-progress
  "$CAO2" eval --data "$images" --dataset mnist --repeat "$REPEAT" --out "$OUT/eval-$name-before" --quiet
  "$CAO2" eval --data "$OUT/$name-refined" --repeat "$REPEAT" --out "$OUT/eval-$name-after" --quiet
done

"$PY" - "$OUT" "$REPEAT" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out, repeat = Path(sys.argv[1]), sys.argv[2]
def acc(name):
    s = json.loads((out / name / "eval.json").read_text())["summary"]["final_acc"]
    return f"{s['mean']:.1f} ± {s['std']:.1f}"
print(f"MNIST world, IPC 10, ConvNet-3, hard labels, 50 epochs, final-epoch test accuracy (%), mean ± std of {repeat} students")
print()
print("| images | before | after `cao2 refine` (CLO, 100 iterations) |")
print("|---|---|---|")
print(f"| random real subset | {acc('eval-real-before')} | {acc('eval-real-after')} |")
print(f"| raw DiT pool (no OSS, no CLO) | {acc('eval-pool-before')} | {acc('eval-pool-after')} |")
PY
