"""Figures of the MNIST-world study (docs/mnist-world.md), from its `cao2 sweep` reports.

    .venv/bin/python benchmarks/mnist_study_figures.py out/study docs/figures

STUDY/val-ipc{1,10}-{hard,rded}/sweep.json (--grid guidance x order, students on the validation split) give
FIGURES/world-choice.png.
Reads STUDY/clo-lr-iters/sweep.json (--grid clo-lr x clo-iters) and STUDY/clo-tmax-condition*/sweep.json
(--grid clo-tmax x condition at two step sizes) and writes FIGURES/clo-lr-iters.png (latent displacement, the judge's probability of
the class after CLO, pixel change, against the learning rate, one line per iteration count), FIGURES/clo-loss.png
(the loss terms per iteration, averaged over the samples, at a few points) and FIGURES/clo-tmax-condition.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def points(report: Path) -> list[dict]:
    data = json.loads(report.read_text())
    return [p for p in data["points"] if p.get("measures", {}).get("samples")]


def by(points_, key):
    out = {}
    for p in points_:
        out.setdefault(p["values"][key], []).append(p)
    return out


def world_choice(study: Path, figures: Path) -> None:
    fig, ax = plt.subplots(1, 4, figsize=(13, 3.0), dpi=120, sharey=False)
    for a, (ipc, protocol) in zip(ax, [(1, "hard"), (1, "rded"), (10, "hard"), (10, "rded")]):
        report = study / f"val-ipc{ipc}-{protocol}" / "sweep.json"
        if not report.is_file():
            continue
        for order, group in sorted(by(points(report), "order").items()):
            group = sorted(group, key=lambda p: p["values"]["guidance"])
            a.errorbar([p["values"]["guidance"] for p in group],
                       [p["summary"]["final_acc"]["mean"] for p in group],
                       yerr=[p["summary"]["final_acc"]["std"] for p in group], marker="o", capsize=3,
                       label=f"order {order}")
        a.set_title(f"IPC {ipc}, {protocol}", fontsize=8)
        a.set_xlabel("guidance")
    ax[0].set_ylabel("validation accuracy (%)")
    ax[0].legend(fontsize=7)
    save(fig, figures / "world-choice.png",
         "OSS + CLO on the MNIST world: ConvNet-3 accuracy on the validation split (one student per point)")


def lr_iters(study: Path, figures: Path) -> None:
    pts = points(study / "clo-lr-iters" / "sweep.json")
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.2), dpi=120)
    for iters, group in sorted(by(pts, "clo-iters").items()):
        group = sorted(group, key=lambda p: p["values"]["clo-lr"])
        lr = [p["values"]["clo-lr"] for p in group]
        m = [p["measures"] for p in group]
        ax[0].plot(lr, [x["displacement"]["mean"] for x in m], "o-", label=f"{iters} iterations")
        ax[1].plot(lr, [x["p_class"]["after"] for x in m], "o-", label=f"{iters} iterations (mean)")
        ax[1].plot(lr, [x["p_class"]["min_after"] for x in m], "x:", color=ax[1].lines[-1].get_color())
        ax[2].plot(lr, [100 * x["pixel_change"]["mean"] for x in m], "o-", label=f"{iters} iterations")
    before = pts[0]["measures"]["p_class"]["before"]
    ax[1].axhline(before, color="grey", lw=0.8, ls="--")
    titles = ("latent displacement ||z - z0|| / ||z0||", "judge's p(class) after CLO (x: least sample)",
              "mean pixel change (% of range)")
    for a, t in zip(ax, titles):
        a.set_xscale("log")
        a.set_xlabel("--clo-lr")
        a.set_title(t, fontsize=8)
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=7)
    save(fig, figures / "clo-lr-iters.png",
         "CLO on the MNIST world, IPC 10, 100 latents: lr x iterations (dashed: p(class) before CLO)")

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2), dpi=120)
    for p in sorted(pts, key=lambda p: (p["values"]["clo-iters"], p["values"]["clo-lr"])):
        v, loss = p["values"], p["measures"]["loss"]
        if v["clo-iters"] != 1000 or v["clo-lr"] not in (6e-4, 6e-3, 6e-2):
            continue
        for a, term in zip(ax, ("mean", "max")):
            a.plot(range(1, len(loss[term]["curve"]) + 1), loss[term]["curve"], lw=0.8, label=f"lr {v['clo-lr']:g}")
    ax[0].set_title("mean squared error term, mean over samples", fontsize=8)
    ax[1].set_title("max |error| term, mean over samples", fontsize=8)
    for a in ax:
        a.set_xlabel("CLO iteration")
        a.set_xscale("log")
        a.legend(fontsize=7)
    save(fig, figures / "clo-loss.png",
         "CLO loss terms per iteration (1000 iterations; each iteration draws its own noise level)")


def tmax_condition(study: Path, figures: Path) -> None:
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.2), dpi=120)
    for folder, style in (("clo-tmax-condition", ":"), ("clo-tmax-condition-lr2e-2", "-")):
        report = study / folder / "sweep.json"
        if not report.is_file():
            continue
        pts = points(report)
        lr = json.loads(report.read_text())["config"]["clo_lr"]
        for k, (cond, group) in enumerate(sorted(by(pts, "condition").items())):
            group = sorted(group, key=lambda p: p["values"]["clo-tmax"])
            t = [p["values"]["clo-tmax"] for p in group]
            kw = dict(color=f"C{k}", ls=style, marker="o", label=f"{cond}, lr {lr:g}")
            ax[0].plot(t, [p["measures"]["displacement"]["mean"] for p in group], **kw)
            ax[1].plot(t, [p["measures"]["p_class"]["after"] for p in group], **kw)
            ax[2].plot(t, [100 * p["measures"]["pixel_change"]["mean"] for p in group], **kw)
    for a, title in zip(ax, ("latent displacement", "judge's p(class) after CLO", "mean pixel change (% of range)")):
        a.set_title(title, fontsize=8)
        a.set_xlabel("--clo-tmax (T-hat, of 999)")
    ax[0].legend(fontsize=6, title="--condition", title_fontsize=7)
    save(fig, figures / "clo-tmax-condition.png",
         "CLO's T-hat x condition, at the default lr 6e-4 x 100 iterations (dotted) and at 2e-2 x 300 (solid)")


if __name__ == "__main__":
    study, figures = Path(sys.argv[1]), Path(sys.argv[2])
    figures.mkdir(parents=True, exist_ok=True)
    world_choice(study, figures)
    lr_iters(study, figures)
    tmax_condition(study, figures)
    print(f"wrote {figures}/world-choice.png, clo-lr-iters.png, clo-loss.png, clo-tmax-condition.png")
