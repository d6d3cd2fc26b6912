"""Peak resident memory of loading a DiT checkpoint in the original facebookresearch layout (a random DiT-B/2 by
default, about 520 MB; ``--size xl``: DiT-XL/2's 2.7 GB), each way in a fresh process:

* ``mapped``: cao2's loader: ``torch.load(mmap=True)`` and the tensors assigned into the model
  (``load_state_dict(assign=True)``), one copy of the weights;
* ``copied``: the loader before: the file read whole, then copied into a randomly initialised model.

Peak RSS after the model is loaded and every parameter read once (as a first forward pass would), minus the
peak after the imports: the process's own high-water mark, ``VmHWM`` of ``/proc/self/status`` (Linux).
``getrusage``'s ``ru_maxrss`` would not do: a child keeps the high-water mark of the parent it was forked from
across ``exec``, here the parent that built the checkpoint.

    python benchmarks/load_memory.py [--size b|xl]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {"b": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
         "xl": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72)}


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024      # kB
    raise SystemExit("no VmHWM in /proc/self/status: this measurement needs Linux")


def child(path: str, mode: str) -> None:
    import torch

    from cao2core.generators import weights
    if mode == "copied":
        weights.torch_load = lambda p, safe_globals=(): torch.load(p, map_location="cpu", weights_only=True)
        weights.load_into = lambda module, state: module.load_state_dict(state, strict=True)
    from cao2_dit import loading
    base = peak_mib()
    model = loading.load_transformer(path)
    checksum = sum(float(p.double().sum()) for p in model.parameters())   # every page read once
    print(json.dumps({"mode": mode, "base_mib": base, "peak_mib": peak_mib(), "checksum": checksum,
                      "params": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="b")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch
    from diffusers import DiTTransformer2DModel
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from dit_files import to_original       # the original layout, as the tests build it
    with tempfile.TemporaryDirectory(prefix="cao2-load-memory-") as tmp:
        path = Path(tmp) / f"DiT-{args.size.upper()}-2-256x256.pt"
        torch.manual_seed(0)
        model = DiTTransformer2DModel(in_channels=4, out_channels=8, sample_size=32, patch_size=2,
                                      num_embeds_ada_norm=1000, **SIZES[args.size])
        torch.save(to_original(model), path)
        del model
        size_mib = path.stat().st_size / 2**20
        rows = [json.loads(subprocess.run([sys.executable, __file__, "--child", str(path), mode], check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for mode in ("copied", "mapped")]
    assert rows[0]["checksum"] == rows[1]["checksum"], "the two loads differ"
    print(f"checkpoint DiT-{args.size.upper()}/2, {rows[0]['params'] / 1e6:.1f}M parameters, {size_mib:.0f} MiB")
    for r in rows:
        print(f"{r['mode']}: peak RSS {r['peak_mib']:.0f} MiB, {r['peak_mib'] - r['base_mib']:.0f} MiB above the "
              f"{r['base_mib']:.0f} MiB after imports ({(r['peak_mib'] - r['base_mib']) / size_mib:.2f}x the file)")


if __name__ == "__main__":
    main()
