#!/usr/bin/env bash
# CaO2 ablation on the embedded MNIST world at its defaults: `cao2 ablate` (pool, OSS only, CLO only, OSS + CLO on
# shared seeds) at each IPC under each protocol (hard labels; rded: soft labels from the embedded judge), plus the
# random-real baseline at the same IPC and protocol and the full-data ceiling; ConvNet-3, 50 epochs, 3 students
# each, scored on the 10k MNIST test split (the defaults were chosen on the validation split: docs/mnist-world.md).
# Writes OUT/<protocol>/ipc*/ (runs, ablation.json/.md/.png) and OUT/summary.md. A rerun reuses what is finished.
# Each protocol distills its own copy of the variants (same seeds, so the same sets).
#
#   bash benchmarks/mnist_ablation.sh                     # IPC 1, 10, 50, both protocols: about 3 hours, 2 cores
#   IPCS="1 10" PROTOCOLS=hard REPEAT=5 OUT=out/abl bash benchmarks/mnist_ablation.sh
set -euo pipefail
OUT=${OUT:-out/mnist-ablation}
REPEAT=${REPEAT:-3}
IPCS=${IPCS:-1 10 50}
PROTOCOLS=${PROTOCOLS:-hard rded}
FULL_EPOCHS=${FULL_EPOCHS:-1}
CAO2=${CAO2:-.venv/bin/cao2}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

for ipc in $IPCS; do
  for protocol in $PROTOCOLS; do
    dest="$OUT/$protocol/ipc$ipc"
    "$CAO2" ablate --preset mnist --ipc "$ipc" --repeat "$REPEAT" --protocol "$protocol" --out "$dest" --no-progress
    [ -f "$dest/random-real/eval.json" ] ||
      "$CAO2" eval --random-real "$ipc" --dataset mnist --repeat "$REPEAT" --protocol "$protocol" \
        --out "$dest/random-real" --quiet
  done
done
[ -f "$OUT/full-real/eval.json" ] ||
  "$CAO2" eval --full-real --dataset mnist --epochs "$FULL_EPOCHS" --eval-every "$FULL_EPOCHS" --out "$OUT/full-real" --quiet

"$PY" - "$OUT" "$REPEAT" "$FULL_EPOCHS" "$IPCS" "$PROTOCOLS" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out, repeat, full_epochs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
ipcs, protocols = [int(i) for i in sys.argv[4].split()], sys.argv[5].split()
def acc(report):
    s = report["summary"]["final_acc"]
    return f"{s['mean']:.1f} ± {s['std']:.1f}"
names = {"pool": "DiT pool, no OSS, no CLO", "oss": "OSS only", "clo": "CLO only", "oss+clo": "CaO2 (OSS + CLO)",
         "random real": "random real subset"}
full = acc(json.loads((out / "full-real" / "eval.json").read_text()))
print(f"MNIST world at its defaults, ConvNet-3, 50 epochs, final-epoch accuracy (%) on the 10k test split, "
      f"mean ± std of {repeat} students")
print()
print("| training set | " + " | ".join(f"{p} IPC {i}" for p in protocols for i in ipcs) + " |")
print("|---|" + "---|" * (len(ipcs) * len(protocols)))
rows = {}
for p in protocols:
    for ipc in ipcs:
        abl = json.loads((out / p / f"ipc{ipc}" / "ablation.json").read_text())
        for v in abl["variants"]:
            rows.setdefault(v["variant"], []).append(acc(v))
        rows.setdefault("random real", []).append(acc(json.loads((out / p / f"ipc{ipc}" / "random-real" / "eval.json").read_text())))
for key, name in names.items():
    print(f"| {name} | " + " | ".join(rows[key]) + " |")
print(f"| full real training set, 50k images ({full_epochs} epoch(s), 1 student, hard labels) | "
      + " | ".join([full] * (len(ipcs) * len(protocols))) + " |")
PY
