#!/usr/bin/env bash
# CaO2 ablation on the embedded MNIST world: `cao2 ablate` at IPC 1 and IPC 10 (3 student repeats each, ConvNet-3,
# hard labels unless PROTOCOL says otherwise), plus the random-real baseline at the same IPC under the same protocol
# and the full-data ceiling (hard labels), all scored on the 10k MNIST test split. Writes OUT/ipc*/ (runs,
# ablation.json/.md/.png) and OUT/summary.md. A rerun reuses finished runs and evaluations.
#
#   bash benchmarks/mnist_ablation.sh            # about 25 minutes on 2 idle CPU cores
#   OUT=out/abl REPEAT=5 bash benchmarks/mnist_ablation.sh
#   OUT=out/abl-soft PROTOCOL=rded bash benchmarks/mnist_ablation.sh   # soft labels from the embedded judge
set -euo pipefail
OUT=${OUT:-out/mnist-ablation}
REPEAT=${REPEAT:-3}
PROTOCOL=${PROTOCOL:-hard}
FULL_EPOCHS=${FULL_EPOCHS:-1}
CAO2=${CAO2:-.venv/bin/cao2}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

for ipc in 1 10; do
  "$CAO2" ablate --preset mnist --ipc "$ipc" --repeat "$REPEAT" --protocol "$PROTOCOL" --out "$OUT/ipc$ipc" --no-progress
  [ -f "$OUT/ipc$ipc/random-real/eval.json" ] ||
    "$CAO2" eval --random-real "$ipc" --dataset mnist --repeat "$REPEAT" --protocol "$PROTOCOL" \
      --out "$OUT/ipc$ipc/random-real" --quiet
done
[ -f "$OUT/full-real/eval.json" ] ||
  "$CAO2" eval --full-real --dataset mnist --epochs "$FULL_EPOCHS" --eval-every "$FULL_EPOCHS" --out "$OUT/full-real" --quiet

"$PY" - "$OUT" "$REPEAT" "$FULL_EPOCHS" "$PROTOCOL" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out, repeat, full_epochs, protocol = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
def acc(report):
    s = report["summary"]["final_acc"]
    return f"{s['mean']:.1f} ± {s['std']:.1f}"
rows = {}
for ipc in (1, 10):
    abl = json.loads((out / f"ipc{ipc}" / "ablation.json").read_text())
    for v in abl["variants"]:
        rows.setdefault(v["variant"], {})[ipc] = acc(v)
    rows.setdefault("random real", {})[ipc] = acc(json.loads((out / f"ipc{ipc}" / "random-real" / "eval.json").read_text()))
full = acc(json.loads((out / "full-real" / "eval.json").read_text()))
names = {"pool": "DiT pool, no OSS, no CLO", "oss": "OSS only", "clo": "CLO only", "oss+clo": "CaO2 (OSS + CLO)",
         "random real": "random real subset"}
labels = "hard labels" if protocol == "hard" else f"{protocol} protocol (soft labels from the embedded judge)"
print(f"MNIST world, ConvNet-3, {labels}, 50 epochs, final-epoch test accuracy (%), mean ± std of {repeat} students")
print()
print("| training set | IPC 1 | IPC 10 |")
print("|---|---|---|")
for key, name in names.items():
    print(f"| {name} | {rows[key][1]} | {rows[key][10]} |")
print(f"| full real training set, all 50k images ({full_epochs} epoch(s), 1 student, hard labels) | {full} | {full} |")
PY
