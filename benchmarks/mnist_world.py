"""How much the MNIST world's DiT pools resemble the real regime, over guidance: class consistency and diversity.

For each guidance scale, samples N pool latents per class (the run's own seeding: sample i of class c from its
(seed, c, i) generator), decodes them and reports, against real MNIST validation images (the 10k split held out
from train; never the test split):

* consistency: the embedded judge's accuracy on the raw pool (what OSS can filter; 100% leaves it nothing to do),
  and the share of samples it is at least 99% sure of;
* diversity: the mean pairwise L2 distance of the judge's penultimate features (128-d) between samples of the same
  class, as a fraction of the same on real validation images (1.0: as varied as real digits; the smaller, the
  closer the pool is to one prototype per class).

    .venv/bin/python benchmarks/mnist_world.py --out out/mnist-world          # about 2 minutes on 2 CPU cores

Writes OUT/world.json and OUT/world.png (the two measures against guidance) and prints a table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cao2core.data.classifiers import embedded_mnist_classifier, load_classifier
from cao2core.data.labels import label_space
from cao2core.data.mnist import load_split
from cao2core.generators.host import Host
from cao2core.generators.seeding import unit_generators


def features(clf, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, probabilities) of the judge for pixels in [-1, 1]."""
    with torch.no_grad():
        x = clf.prepare(pixels)
        h = clf.model.features(x)
        head = clf.model.head
        f = head[2](head[1](head[0](h)))            # flatten -> linear -> ReLU: the 128-d features
        return f, head[4](f).softmax(-1)            # (dropout is the identity in eval mode)


def pairwise(f: torch.Tensor) -> float:
    d = torch.cdist(f.double(), f.double())
    n = len(f)
    return float(d.sum() / (n * (n - 1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/mnist-world")
    p.add_argument("--guidance", default="1,1.5,2,3,4")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    space = label_space("mnist")
    clf = load_classifier(str(embedded_mnist_classifier()), space, torch.device("cpu"))
    gen = Host().generator("dit")

    x, y = load_split("val")
    real = {}
    for c in range(10):
        f, _ = features(clf, x[y == c][:args.per_class])
        real[c] = pairwise(f)

    rows = []
    for g in (float(v) for v in args.guidance.split(",")):
        handle = gen.load(options=gen.parse_options({"guidance": g}), device=torch.device("cpu"))
        acc, sure, ratio = [], [], []
        for c in range(10):
            z = torch.cat([gen.sample(handle=handle, labels=torch.full((len(i),), c), snapshot_steps=[],
                                      generators=unit_generators(args.seed, c, i, "sample")).latents
                           for i in (range(k, min(k + 50, args.per_class)) for k in range(0, args.per_class, 50))])
            f, probs = features(clf, gen.decode(handle=handle, latents=z))
            acc.append(float((probs.argmax(1) == c).float().mean()))
            sure.append(float((probs[:, c] >= 0.99).float().mean()))
            ratio.append(pairwise(f) / real[c])
        row = {"guidance": g, "judge_accuracy": 100 * sum(acc) / 10, "judge_sure": 100 * sum(sure) / 10,
               "diversity_vs_real": sum(ratio) / 10, "per_class_accuracy": [round(100 * a, 1) for a in acc]}
        rows.append(row)
        print(f"guidance {g}: judge accuracy {row['judge_accuracy']:.1f}%, >=99% sure {row['judge_sure']:.1f}%, "
              f"diversity {row['diversity_vs_real']:.3f} of real", flush=True)
    (out / "world.json").write_text(json.dumps({"per_class": args.per_class, "seed": args.seed,
                                                "real_split": "val", "rows": rows}, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    gs = [r["guidance"] for r in rows]
    ax[0].plot(gs, [r["judge_accuracy"] for r in rows], "o-", label="judge accuracy on the pool")
    ax[0].plot(gs, [r["judge_sure"] for r in rows], "s--", label="judge >= 99% sure")
    ax[0].set_xlabel("guidance")
    ax[0].set_ylabel("% of pool samples")
    ax[0].legend(fontsize=7)
    ax[1].plot(gs, [r["diversity_vs_real"] for r in rows], "o-")
    ax[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    ax[1].set_xlabel("guidance")
    ax[1].set_ylabel("within-class feature spread / real")
    fig.suptitle(f"MNIST world DiT pools ({args.per_class} per class) vs real validation digits", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "world.png")
    print("| guidance | judge accuracy on the pool (%) | judge >= 99% sure (%) | diversity (fraction of real) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r['judge_accuracy']:.1f} | {r['judge_sure']:.1f} | "
              f"{r['diversity_vs_real']:.3f} |")


if __name__ == "__main__":
    main()
