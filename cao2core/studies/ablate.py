"""``cao2 ablate``: the paper's ablation of CaO2's two parts on one configuration.

Four ``cao2 run`` variants share every option and seed but the two switches: the raw pool (no selection, no
CLO), OSS only, CLO only, and OSS + CLO. Because every draw is seeded by (run seed, class, index), the
variants start from the same samples: ``pool`` and ``clo`` keep pool samples 0..IPC-1, ``oss`` and ``oss+clo``
keep the same selected ones. Each variant is scored by ``cao2 eval`` with one protocol and the same repeats.

Layout: ``OUT/<variant>/`` is a complete ``cao2 run`` output (with ``eval/eval.json``); ``OUT/ablation.json``
and ``OUT/ablation.png`` summarise them. A rerun resumes: finished classes are not redone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import EvalConfig, RunConfig
from ..errors import UserError
from ..store.layout import EVAL_FOLDER, MANIFEST

REPORT, TABLE, CHART = "ablation.json", "ablation.md", "ablation.png"
MARKER = "ablate.json"      # beside a variant's eval.json: the run and eval command it scored
FORMAT = "cao2-ablation/1"


@dataclass(frozen=True)
class Variant:
    name: str
    oss: bool
    clo: bool

    def config(self, base: RunConfig) -> RunConfig:
        return replace(base, select=base.select if self.oss else "none", clo_iters=base.clo_iters if self.clo else 0,
                       out=str(Path(base.out) / self.name))


VARIANTS = (Variant("pool", False, False), Variant("oss", True, False), Variant("clo", False, True),
            Variant("oss+clo", True, True))


@dataclass
class AblationResult:
    """The four variants' runs and scores: ``report`` is OUT/ablation.json; ``files`` what was written."""

    report: dict
    out: Path
    files: list[Path]

    def table(self) -> str:
        return table(self.report)

    @property
    def accuracy(self) -> dict[str, float]:
        """Each variant's final-epoch test accuracy (mean over the students)."""
        return {row["variant"]: row["summary"]["final_acc"]["mean"] for row in self.report["variants"]}


def study_evaluation(template: EvalConfig, data: str) -> EvalConfig:
    """The evaluation of one run of a study: the template's settings, on ``data``, its report in DATA/eval/."""
    return replace(template, data=data, out=None, dataset=None)


def known_space(cfg: RunConfig):
    """(label space, whole dataset) of the runs of ``cfg`` when the options name them (``--dataset``), else
    (None, None): the generator's own label space is known only once it is loaded."""
    if cfg.dataset is None:
        return None, None
    from ..data.labels import label_space
    from ..generators.host import Host
    try:
        full = label_space(cfg.dataset)
    except UserError:           # perhaps one of the generator plugin's own label spaces
        full = label_space(cfg.dataset, Host().generator(cfg.generator).label_spaces())
    return full.select(cfg.classes), full


def check_before_running(configs: list[RunConfig], evals: list[EvalConfig], out: Path,
                         names: list[str] | None = None) -> None:
    """Every option of every run and evaluation, checked before the first run starts; ``names`` (a sweep's
    points) prefix a run's error with the point it belongs to."""
    from ..scoring.evaluation import check
    for k, cfg in enumerate(configs):
        try:
            cfg.validate()
        except UserError as exc:
            if names is None:
                raise
            raise UserError(f"--grid point {names[k]}: {exc}") from None
        if cfg.dry_run:
            raise UserError("--dry-run is for `cao2 run`; this command runs and scores every configuration")
    for evaluation in evals:
        evaluation.validate()
    if evals:               # they differ only in --data: student, teacher and folders are checked once per space
        for dataset, classes in dict.fromkeys((c.dataset, c.classes) for c in configs):
            check(evals[0], *known_space(replace(configs[0], dataset=dataset, classes=classes)))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")


def ablate(base: RunConfig, evaluation: EvalConfig) -> AblationResult:
    """Run and score the four variants of ``base`` (its ``out`` holds them); ``evaluation``: the students'
    settings (its ``data`` and ``out`` are set per variant). Writes OUT/ablation.json, .md and .png."""
    from ..method import engine
    from ..scoring.evaluation import evaluate

    if base.select == "none" or base.clo_iters == 0:
        raise UserError("cao2 ablate switches OSS and CLO off in turn, so the base configuration needs both: "
                        "a --select other than none and --clo-iters above 0")
    configs = [v.config(base) for v in VARIANTS]
    evals = [study_evaluation(evaluation, c.out) for c in configs]
    out = Path(base.out)
    check_before_running(configs, evals, out)

    rows = []
    for variant, cfg, ev in zip(VARIANTS, configs, evals):
        print(f"== {variant.name}: select={cfg.select}, clo-iters={cfg.clo_iters} -> {cfg.out}", flush=True)
        engine.run(cfg)
        report = scored(Path(cfg.out), ev, evaluate)
        rows.append({"variant": variant.name, "oss": variant.oss, "clo": variant.clo, "out": cfg.out,
                     "select": cfg.select, "clo_iters": cfg.clo_iters, "summary": report["summary"],
                     "eval_settings": report["config"]["settings"], "dataset": report["data"]["dataset"]})
    result = {"format": FORMAT, "config": base.output_key(),
              "eval_command": " ".join(["cao2", *study_evaluation(evaluation, "OUT/<variant>").to_argv()]),
              "variants": rows}
    from ..store.files import write_files
    files = write_files(out, {REPORT: (json.dumps(result, indent=2) + "\n").encode(),
                              TABLE: (table(result) + "\n").encode(), CHART: bar_chart(result)})
    return AblationResult(result, out, files)


def scored(out: Path, evaluation: EvalConfig, evaluate) -> dict:
    """The eval report of the run in ``out``; a rerun reuses it when the run and the evaluation are unchanged."""
    from ..scoring.report import reuse_or_evaluate
    key = {"run_id": json.loads((out / MANIFEST).read_text())["run_id"], "eval": evaluation.to_argv()}
    return reuse_or_evaluate(out / EVAL_FOLDER, key, lambda: evaluate(evaluation), MARKER)


def table(result: dict) -> str:
    """The paper-style ablation table (final-epoch accuracy, mean ± std; best epoch labelled as such)."""
    from ..scoring.report import pm
    first = result["variants"][0]
    st = first["eval_settings"]
    lines = [f"Ablation on {first['dataset']}, IPC {result['config']['ipc']}: "
             f"{st['protocol']} protocol, {st['student']}, {st['epochs']} epochs, "
             f"{first['summary']['repeats']} repeats",
             "", "| OSS | CLO | variant | final acc (%) | best-epoch acc (%) |", "|---|---|---|---|---|"]
    for r in result["variants"]:
        s = r["summary"]
        lines.append(f"| {'✓' if r['oss'] else '–'} | {'✓' if r['clo'] else '–'} | {r['variant']} | "
                     f"{pm(s['final_acc'])} | {pm(s['best_epoch_acc'])} |")
    lines += ["", "Final acc: test accuracy after the last epoch. Best-epoch acc is picked on the test set "
                  "(optimistic)."]
    return "\n".join(lines)


def bar_chart(result: dict) -> bytes:
    from ..scoring.figures import png_of, pyplot
    plt = pyplot()
    names = [r["variant"] for r in result["variants"]]
    means = [r["summary"]["final_acc"]["mean"] for r in result["variants"]]
    stds = [r["summary"]["final_acc"]["std"] for r in result["variants"]]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    bars = ax.bar(names, means, yerr=stds, capsize=4, color=["#999999", "#4c72b0", "#dd8452", "#55a868"])
    bottom = max(0.0, min(m - s for m, s in zip(means, stds)) - 10)
    for bar, m in zip(bars, means):      # the value inside the bar's foot, clear of the error bar
        ax.annotate(f"{m:.1f}", (bar.get_x() + bar.get_width() / 2, bottom), ha="center", va="bottom", fontsize=9,
                    color="white", fontweight="bold", xytext=(0, 4), textcoords="offset points")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_ylim(bottom, min(100.0, max(m + s for m, s in zip(means, stds)) + 5))
    ax.set_title(f"CaO2 ablation, IPC {result['config']['ipc']}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return png_of(fig)
