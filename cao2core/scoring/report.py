"""The evaluation report: summary statistics, eval.json, the markdown table and the accuracy plot.

The figure of a protocol is the FINAL-epoch test accuracy (mean ± std over repeats), except rded-faithful,
whose figure is RDED's: the best test accuracy among the evaluations in the last 20% of training. The best
accuracy over all evaluated epochs is always reported too, labelled "best epoch": it is picked on the test set,
so it is optimistic and not a held-out figure.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from ..store.files import write_files
from .protocols import PROTOCOLS, RepeatResult

FORMAT = "cao2-eval/1"
REPORT = "eval.json"
PLOT = "eval.png"

HEADLINES = {"final": "final-epoch test accuracy",
             "best-last-20%": "best test accuracy among the evaluations in the last 20% of training (RDED's figure)"}


def stats(values: list[float]) -> dict:
    """Mean and population std (numpy's default, as dataset-distillation papers report) of per-repeat values."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(results: list[RepeatResult], protocol: str) -> dict:
    headline = PROTOCOLS[protocol].headline
    return {
        "repeats": len(results),
        "final_acc": {**stats([r.final_acc for r in results]),
                      "what": "final-epoch test accuracy (%), after the last epoch"},
        "best_epoch_acc": {**stats([r.best_acc for r in results]),
                           "epochs": [r.best_epoch for r in results],
                           "what": "best test accuracy over the evaluated epochs (%); chosen on the test set, "
                                   "so optimistic"},
        "headline": {"metric": headline, "what": HEADLINES[headline],
                     **stats([r.headline_acc for r in results])},
        "wall_s": sum(r.wall_s for r in results),
        "test_s": sum(r.test_s for r in results),
    }


def build_report(config: dict, data: dict, results: list[RepeatResult]) -> dict:
    return {"format": FORMAT, "config": config, "data": data,
            "repeats": [asdict(r) for r in results],
            "summary": summarize(results, config["settings"]["protocol"])}


def pm(s: dict) -> str:
    """A summary's mean ± std, two decimals."""
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def markdown(report: dict) -> str:
    cfg, s = report["config"], report["summary"]
    st = cfg["settings"]
    faithful = s["headline"]["metric"] != "final"
    head = ["data", "protocol", "student", "epochs", "repeats", "final acc (%)", "best-epoch acc (%)"]
    row = [report["data"]["label"], st["protocol"], st["student"], str(st["epochs"]), str(s["repeats"]),
           pm(s["final_acc"]), pm(s["best_epoch_acc"])]
    if faithful:
        head.append("RDED figure: best of last 20% (%)")
        row.append(pm(s["headline"]))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", ""]
    lines.append("| repeat | final acc (%) | best-epoch acc (%) | best epoch | wall (s) | of which testing (s) |")
    lines.append("|---|---|---|---|---|---|")
    for r in report["repeats"]:
        lines.append(f"| {r['repeat']} | {r['final_acc']:.2f} | {r['best_acc']:.2f} | {r['best_epoch']} | "
                     f"{r['wall_s']:.1f} | {r['test_s']:.1f} |")
    lines.append("")
    lines.append(f"Figure: {s['headline']['what']}. Best-epoch accuracy is picked on the test set (optimistic). "
                 f"Test set: {report['data']['val']}.")
    return "\n".join(lines)


def plot_png(report: dict) -> bytes:
    from .figures import png_of, pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in report["repeats"]:
        pts = [(e["epoch"], e["test_acc"]) for e in r["curve"] if "test_acc" in e]
        ax.plot(*zip(*pts), marker="o", markersize=3, linewidth=1, label=f"repeat {r['repeat']}")
    st = report["config"]["settings"]
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['data']['label']}: {st['protocol']}, {st['student']}", fontsize=9)
    ax.grid(alpha=0.3)
    if len(report["repeats"]) <= 10:
        ax.legend(fontsize=7)
    return png_of(fig)


def reuse_or_evaluate(folder: Path, key: dict, evaluate, marker: str) -> dict:
    """The eval report in ``folder``. ``evaluate()`` (re)writes it unless the ``marker`` file beside it records
    this same ``key`` (what was scored and how) and the sha256 of this very report, so a rerun reuses a finished
    evaluation and never one that another command replaced."""
    mark, report = folder / marker, folder / REPORT
    if mark.is_file() and report.is_file():
        try:
            recorded = json.loads(mark.read_text())
        except (OSError, ValueError):
            recorded = None
        data = report.read_bytes()
        if recorded == {"key": key, "report_sha256": hashlib.sha256(data).hexdigest()}:
            print(f"   reusing {report} (same data, same evaluation)", flush=True)
            return json.loads(data)
    evaluate()
    data = report.read_bytes()
    write_files(folder, {marker: json.dumps({"key": key, "report_sha256": hashlib.sha256(data).hexdigest()}).encode()})
    return json.loads(data)


def write_outputs(out: Path, report: dict, plot: bool) -> list[Path]:
    """Write eval.json (and eval.png) into ``out``."""
    return write_files(out, {REPORT: (json.dumps(report, indent=2) + "\n").encode(),
                             PLOT: plot_png(report) if plot else None})
