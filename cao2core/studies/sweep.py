"""``cao2 sweep``: one configuration, a grid of values for some of its flags, every point run on the same seeds.

``--grid clo-lr=6e-4,1e-2,1e-1 --grid clo-iters=100,300`` runs the six points of the product, each a complete
``cao2 run`` output in ``OUT/<point>/``. The points share the seed and every other option, and every draw is
seeded by (run seed, class, index), so when only CLO flags vary the pools and the selections are the same at
every point and the differences are CLO's.

Each point is measured from what it wrote: how far CLO moved the kept latents (``‖z−z₀‖/‖z₀‖``), the run's
classifier's probability of the class on the decoded image before and after CLO, and the pixel change of the
decoded images. Unless ``--no-eval``, each point is also scored by ``cao2 eval`` (one protocol, the same repeats).
Writes ``OUT/sweep.json``, ``OUT/sweep.md`` and ``OUT/sweep.png``; a rerun resumes (finished classes, measures
and evaluations are kept).
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..config import EvalConfig, RunConfig
from ..errors import UserError
from ..store.layout import MANIFEST
from .ablate import check_before_running, scored, study_evaluation

REPORT, TABLE, CHART = "sweep.json", "sweep.md", "sweep.png"
MEASURES = "sweep-measures.json"    # in OUT/<point>/eval/: the measures and the run state they describe
FORMAT = "cao2-sweep/1"
FIELDS = {f.name: f for f in fields(RunConfig)}


@dataclass(frozen=True)
class Axis:
    """One varied option of a sweep: a RunConfig field and its values (``texts``: the values as written, which
    name the points' folders)."""

    name: str                   # the RunConfig field
    values: tuple               # typed, as the field takes them
    texts: tuple[str, ...] = ()  # as given on the command line; default: the values printed

    def __post_init__(self):
        if not self.texts:
            object.__setattr__(self, "texts", tuple(_fmt(v) for v in self.values))

    @property
    def flag(self) -> str:
        """The field as a flag without dashes: clo-lr."""
        return self.name.replace("_", "-")


@dataclass
class SweepResult:
    """Every point's run, measures and (when scored) students: ``report`` is OUT/sweep.json."""

    report: dict
    out: Path
    files: list[Path]

    def table(self) -> str:
        return table(self.report)


def axes_of(grid: dict | list, given: set[str] = frozenset()) -> list[Axis]:
    """The sweep's axes from ``{field or flag name: [values]}`` (or Axis objects), checked: each a RunConfig
    field that changes what a run writes, named once, with distinct values; ``given``: the fields also set as
    plain flags (refused: which one would win?)."""
    items = list(grid) if isinstance(grid, (list, tuple)) else [
        Axis(key.strip().lstrip("-").replace("-", "_"), tuple(values)) for key, values in grid.items()]
    axes: list[Axis] = []
    for axis in items:
        name, flag = axis.name, axis.flag
        f = FIELDS.get(name)
        if f is None or "run" not in f.metadata["commands"]:
            raise UserError(f"--grid {flag}: not a `cao2 run` flag; use a flag name such as clo-lr, clo-iters, "
                            "clo-tmax or condition")
        if not f.metadata["affects_output"]:
            raise UserError(f"--grid {flag}: --{flag} does not change what a run writes, so every point would be "
                            "the same set; sweep flags that do (clo-lr, clo-iters, ...)")
        if f.metadata.get("nargs") == "append_kv":
            raise UserError(f"--grid cannot vary --{flag}; run one sweep per --{flag} value")
        if any(a.name == name for a in axes):
            raise UserError(f"--grid {flag} is given twice; list all its values in one --grid {flag}=V1,V2,...")
        if name in given:
            raise UserError(f"--{flag} is given both as a flag and in --grid; drop one of them")
        if not axis.values:
            raise UserError(f"--grid {flag} has no values")
        seen: dict[str, str] = {}
        for text, value in zip(axis.texts, axis.values):
            if json.dumps(value) in seen:
                raise UserError(f"--grid {flag}: {seen[json.dumps(value)]!r} and {text!r} are the same value; "
                                "list each value once")
            seen[json.dumps(value)] = text
        axes.append(axis)
    if not axes:
        raise UserError("cao2 sweep needs at least one --grid KEY=V1,V2,... (e.g. --grid clo-lr=6e-4,1e-2,1e-1)")
    return axes


def point_config(base: RunConfig, values: dict, out: str) -> RunConfig:
    """``base`` with a point's values; a T-hat a --preset derived from the sampling steps follows the point's."""
    cfg = replace(base, **values, out=out,
                  from_preset={k: v for k, v in base.from_preset.items() if k not in values})
    if "clo_tmax" in cfg.from_preset and values.keys() & {"sample_steps", "timestep_convention", "profile"}:
        from ..method import presets
        preset = presets.get(cfg.from_preset["clo_tmax"])
        cfg = replace(cfg, clo_tmax=preset.options_for(cfg.profile, cfg.sample_steps,
                                                       cfg.timestep_convention)["clo_tmax"])
    return cfg


def check_generators(configs: list[RunConfig], names: list[str]) -> None:
    """What each point's generator decides (its --clo-tmax range, its label space), checked for every point
    before the first runs: the generator is loaded once per distinct generator configuration."""
    from ..environment import resolve_device
    from ..generators.host import Host
    from ..method import clo, engine

    host, loaded = Host(), {}
    for cfg, name in zip(configs, names):
        try:
            key = json.dumps([cfg.generator, cfg.gen_options(), cfg.device], sort_keys=True, default=str)
            if key not in loaded:
                gen = host.generator(cfg.generator)
                handle = gen.load(options=gen.parse_options(cfg.gen_options()), device=resolve_device(cfg.device))
                loaded[key] = (gen, gen.latent_spec(handle=handle))
                del handle
            gen, spec = loaded[key]
            level_max = cfg.clo_tmax if cfg.clo_tmax is not None else spec.default_level_max
            try:
                clo.check_levels(clo.CLOSettings(level_min=spec.level_range[0], level_max=level_max),
                                 spec.level_range)
            except UserError as exc:
                raise UserError(f"{exc}{cfg.origin('clo_tmax')}") from None
            engine.resolve_classes(cfg, spec, gen.label_spaces())
        except UserError as exc:
            raise UserError(f"--grid point {name}: {exc}") from None


def point_names(axes: list[Axis]) -> list[tuple[str, dict, str]]:
    """(folder name, {field: value}, the values as given) of every point, the first axis varying slowest."""
    points = []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        name = "_".join(f"{a.flag}-{re.sub(r'[^A-Za-z0-9.+-]', '-', a.texts[i])}" for a, i in zip(axes, combo))
        points.append((name, {a.name: a.values[i] for a, i in zip(axes, combo)},
                       ", ".join(f"{a.flag}={a.texts[i]}" for a, i in zip(axes, combo))))
    names = [n for n, _, _ in points]
    clash = [n for n in names if names.count(n) > 1]
    if clash:
        raise UserError(f"two --grid points share the folder name {clash[0]!r}; write the values differently")
    return points


def sweep(base: RunConfig, grid: dict | list, evaluation: EvalConfig | None = None, given: set[str] = frozenset()
          ) -> SweepResult:
    """Run, measure and (with ``evaluation``: the students' settings) score every point of ``grid`` (``{field:
    [values]}``, the first varying slowest) on ``base``'s seeds; each point is OUT/<point>/. Writes
    OUT/sweep.json, .md and .png. ``given``: fields the caller set explicitly (a field both given and varied is
    refused)."""
    from ..method import engine
    from ..scoring.evaluation import evaluate
    from ..store.files import write_files

    axes = axes_of(grid, given)
    points = point_names(axes)
    out = Path(base.out)
    configs = [point_config(base, values, str(out / name)) for name, values, _ in points]
    evals = [study_evaluation(evaluation, c.out) for c in configs] if evaluation is not None else []
    check_before_running(configs, evals, out, [name for name, _, _ in points])
    check_generators(configs, [name for name, _, _ in points])

    measure = Measurer()
    rows = []
    for k, ((name, values, shown), cfg) in enumerate(zip(points, configs)):
        print(f"== point {k + 1}/{len(points)}: {shown} -> {cfg.out}", flush=True)
        try:
            result = engine.run(cfg)
        except UserError as exc:
            raise UserError(f"--grid point {name}: {exc}") from None
        row = {"point": name, "values": {a.flag: values[a.name] for a in axes}, "out": cfg.out,
               "failed": result.failed, "measures": measure(cfg, Path(cfg.out)), "summary": None}
        if result.failed:
            cid, reason = next(iter(result.failed.items()))
            print(f"   {len(result.failed)} class(es) failed (class {cid}: {reason}); the point is not scored",
                  flush=True)
        elif evals:
            report = scored(Path(cfg.out), evals[k], evaluate)
            row.update(summary=report["summary"], eval_settings=report["config"]["settings"],
                       val=report["data"]["val"])
        rows.append(row)
    manifest = json.loads((Path(configs[0].out) / MANIFEST).read_text())
    varied = {a.name for a in axes}
    result = {"format": FORMAT, "config": {k: v for k, v in base.output_key().items() if k not in varied},
              "dataset": manifest["dataset"], "classes": manifest["class_ids"],
              "grid": {a.flag: list(a.values) for a in axes},
              "eval_command": " ".join(["cao2", *study_evaluation(evaluation, "OUT/<point>").to_argv()])
              if evaluation is not None else None, "points": rows}
    files = write_files(out, {REPORT: (json.dumps(result, indent=2) + "\n").encode(),
                              TABLE: (table(result) + "\n").encode(), CHART: chart(result)})
    return SweepResult(result, out, files)


class Measurer:
    """Measures of a point from its written latents: CLO's displacement, and, decoded with the run's generator,
    the run's classifier's probability of the class and the pixel change before and after CLO. The generator and
    classifier of the previous point are kept while the next one uses the same."""

    def __init__(self):
        self._gen: tuple = (None, None)
        self._clf: tuple = (None, None)

    def __call__(self, cfg: RunConfig, out: Path) -> dict:
        from ..store.files import write_files
        manifest = json.loads((out / "manifest.json").read_text())
        entries = manifest.get("classes") if isinstance(manifest.get("classes"), dict) else {}
        complete = [c for c in manifest["class_ids"]
                    if isinstance(entries.get(c), dict) and entries[c].get("status") == "complete"]
        key = {"run_id": manifest["run_id"], "classes": complete}
        cache = out / "eval" / MEASURES
        if cache.is_file():
            try:
                saved = json.loads(cache.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("key") == key:
                return saved["measures"]
        measures = self._measure(cfg, out, manifest, complete)
        record = json.dumps({"key": key, "measures": measures}, indent=2) + "\n"
        write_files(out / "eval", {MEASURES: record.encode()})
        return measures

    def _measure(self, cfg: RunConfig, out: Path, manifest: dict, complete: list[str]) -> dict:
        import torch
        from safetensors.torch import load_file

        from ..environment import resolve_device
        from ..method.engine import classifier_input
        from ..data.labels import label_space
        from ..method.pools import in_chunks

        if not complete:
            return {"samples": 0}
        device = resolve_device(cfg.device)
        gen, handle = self._generator(cfg, device)
        # as the run resolved them: the generator's own label spaces, the classifier input the run selected with
        space = label_space(manifest["dataset"], gen.label_spaces()).select(",".join(manifest["class_ids"]))
        clf = self._classifier(cfg, space, device, classifier_input(cfg, gen.latent_spec(handle=handle)))
        targets = clf.output_indices(space)
        size = manifest["batch_size"]

        def decode(z):
            return gen.decode(handle=handle, latents=z.to(device)).float().clamp(-1, 1).cpu()

        # classes go through in groups of at most --batch-size latents before and after CLO (at least one class)
        groups, group, rows = [], [], 0
        for pos, cid in enumerate(space.ids):
            if cid not in complete:
                continue
            t = load_file(str(out / "latents" / f"{cid}.safetensors"))
            if group and rows + 2 * len(t["latents"]) > size:
                groups.append(group)
                group, rows = [], 0
            group.append((pos, t))
            rows += 2 * len(t["latents"])
        groups.append(group)
        disp, before, after, top0, top1, change = [], [], [], [], [], []
        curves = {k: [t[f"clo_loss_{k}"] for g in groups for _, t in g if f"clo_loss_{k}" in t] for k in ("mean", "max")}
        for group in groups:
            z = torch.cat([t["latents"] for _, t in group])
            z0 = torch.cat([t["latents_init"] for _, t in group])
            target = torch.cat([torch.full((len(t["latents"]),), targets[pos]) for pos, t in group])
            disp.append((z - z0).double().flatten(1).norm(dim=1) / z0.double().flatten(1).norm(dim=1))
            x0, x1 = in_chunks(decode, torch.cat([z0, z]), size).chunk(2)
            q0, q1 = in_chunks(clf.probs, torch.cat([x0, x1]), size).cpu().chunk(2)
            before.append(q0.gather(1, target[:, None])[:, 0])
            after.append(q1.gather(1, target[:, None])[:, 0])
            top0.append(q0.argmax(1) == target)
            top1.append(q1.argmax(1) == target)
            change.append((x1 - x0).abs().flatten(1).mean(1) / 2)     # [-1, 1] -> a 0-1 intensity scale
        disp, before, after, change = (torch.cat(v) for v in (disp, before, after, change))
        top0, top1 = (torch.cat(v).float() for v in (top0, top1))
        return {
            "samples": len(disp), "classes": len(complete),
            "displacement": {"mean": float(disp.mean()), "max": float(disp.max()),
                             "what": "||z - z0|| / ||z0|| per kept latent: z0 where CLO started, z where it ended"},
            "p_class": {"before": float(before.mean()), "after": float(after.mean()),
                        "min_before": float(before.min()), "min_after": float(after.min()),
                        "what": "the run's classifier's probability of the sample's class on the decoded image, "
                                "before and after CLO: mean (and least) over samples"},
            "classifier_top1": {"before": 100 * float(top0.mean()), "after": 100 * float(top1.mean()),
                                "what": "% of samples the run's classifier assigns to their class"},
            "loss": _loss_summary(curves),
            "pixel_change": {"mean": float(change.mean()),
                             "what": "mean absolute difference of the decoded images before and after CLO, "
                                     "on a 0-1 intensity scale"},
            "classifier": {"option": cfg.classifier, "sha256": clf.sha256},
        }

    def _generator(self, cfg: RunConfig, device):
        from ..generators.host import Host
        key = (cfg.generator, json.dumps(cfg.gen_options(), sort_keys=True, default=str), str(device))
        if self._gen[0] != key:
            self._gen = (None, None)          # release the previous point's generator first
            gen = Host().generator(cfg.generator)
            self._gen = (key, (gen, gen.load(options=gen.parse_options(cfg.gen_options()), device=device)))
        return self._gen[1]

    def _classifier(self, cfg: RunConfig, space, device, input_: str):
        from ..data.classifiers import load_classifier
        key = (cfg.classifier, cfg.classifier_arch, cfg.classifier_classes, space.generator_space, str(device), input_)
        if self._clf[0] != key:
            self._clf = (key, load_classifier(cfg.classifier, space, device, cfg.classifier_arch,
                                              cfg.classifier_classes, input_))
        return self._clf[1]


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count != 1 else ''}"


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def table(result: dict) -> str:
    """One row per point: its grid values, the measures and, when scored, the students' accuracy."""
    from ..scoring.report import pm
    rows = result["points"]
    flags = list(result["grid"])
    scored_rows = [r for r in rows if r["summary"] is not None]
    cfg = result["config"]
    head = (f"Sweep on {result['dataset']} ({len(result['classes'])} classes), IPC {cfg.get('ipc', '(grid)')}, "
            f"seed {cfg.get('seed', '(grid)')}: {len(rows)} points over {', '.join(flags)}")
    if scored_rows:
        st = scored_rows[0]["eval_settings"]
        head += (f"; students: {st['protocol']} protocol, {st['student']}, {_n(st['epochs'], 'epoch')}, "
                 f"{_n(scored_rows[0]['summary']['repeats'], 'repeat')}")
    else:
        head += "; not scored by students" + (" (--no-eval)" if result["eval_command"] is None else "")
    cols = [*flags, "‖z−z₀‖/‖z₀‖ mean (max)", "p(class) before → after", "classifier top-1 (%) before → after",
            "pixel change (% of range)"]
    if result["eval_command"] is not None:
        cols.append("final acc (%)")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m = r["measures"]
        cells = [_fmt(r["values"][f]) for f in flags]
        if m.get("samples"):
            cells += [f"{m['displacement']['mean']:.3g} ({m['displacement']['max']:.3g})",
                      f"{m['p_class']['before']:.4f} → {m['p_class']['after']:.4f}",
                      f"{m['classifier_top1']['before']:.1f} → {m['classifier_top1']['after']:.1f}",
                      f"{100 * m['pixel_change']['mean']:.2f}"]
        else:
            cells += ["–"] * 4
        if result["eval_command"] is not None:
            if r["summary"] is not None:
                cells.append(pm(r["summary"]["final_acc"]))
            else:
                cells.append(f"not scored: {len(r['failed'])} class(es) failed")
        if r["failed"]:
            cells[len(flags)] += (f" [{len(r['failed'])} of {len(result['classes'])} classes failed"
                                  + ("; measured on the others]" if m.get("samples") else "]"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "‖z−z₀‖/‖z₀‖: distance CLO moved each kept latent, relative to its start; p(class) and top-1: the "
                  "run's classifier on the decoded images before and after CLO; pixel change: mean absolute change "
                  "of the decoded images. Means over all kept samples."]
    if scored_rows:
        lines.append(f"Final acc: test accuracy after the last epoch on {scored_rows[0]['val']}, mean ± std of the "
                     "students.")
    return "\n".join(lines)


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None for v in values)


def chart(result: dict) -> bytes:
    """Panels against the first grid key (log scale when its values span a decade or more), one line per
    combination of the other keys: displacement, the classifier's p(class) after CLO, pixel change and, when
    scored, accuracy."""
    from ..scoring.figures import png_of, pyplot
    plt = pyplot()

    flags = list(result["grid"])
    xs = result["grid"][flags[0]]
    numeric = _numeric(xs)
    pos = {json.dumps(x): (x if numeric else i) for i, x in enumerate(xs)}
    panels = [("displacement ‖z−z₀‖/‖z₀‖", lambda r: r["measures"].get("displacement", {}).get("mean")),
              ("p(class) after CLO", lambda r: r["measures"].get("p_class", {}).get("after")),
              ("pixel change (% of range)",
               lambda r: 100 * r["measures"]["pixel_change"]["mean"] if r["measures"].get("samples") else None)]
    scored_rows = [r for r in result["points"] if r["summary"] is not None]
    if scored_rows:
        held_out = "validation" if "val split" in str(scored_rows[0].get("val")) else "test"
        panels.append((f"final {held_out} accuracy (%)",
                       lambda r: r["summary"]["final_acc"]["mean"] if r["summary"] else None))
    lines: dict[str, list] = {}
    for r in result["points"]:
        label = ", ".join(f"{f}={_fmt(r['values'][f])}" for f in flags[1:]) or None
        lines.setdefault(label, []).append(r)
    fig, axs = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), dpi=120, squeeze=False)
    for ax, (title, get) in zip(axs[0], panels):
        for label, rows in lines.items():
            pts = [(pos[json.dumps(r["values"][flags[0]])], get(r)) for r in rows]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=4, linewidth=1.2, label=label)
        if title.startswith("p(class)"):
            before = [r["measures"]["p_class"]["before"] for r in result["points"] if r["measures"].get("samples")]
            if before:      # where CLO started: the same for every point when only CLO flags vary
                ax.axhline(sum(before) / len(before), color="gray", linestyle=":", linewidth=1, label="before CLO")
        if numeric and min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
        ax.ticklabel_format(axis="y", useOffset=False)     # tiny ranges: plain values, not an offset
        ax.set_xlabel(flags[0])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if title.startswith("p(class)"):      # one legend: the lines and where CLO started
            ax.legend(fontsize=7)
    fig.suptitle(f"cao2 sweep on {result['dataset']}", fontsize=9)
    return png_of(fig)


def _loss_summary(curves: dict) -> dict:
    """CLO's loss terms over the iterations, averaged over the samples: the curves, and their first and last tenth
    (each iteration draws its own levels, so single iterations are noisy)."""
    import torch
    if not curves["mean"] or curves["mean"][0].shape[1] == 0:
        return {"iterations": 0}
    out = {"iterations": curves["mean"][0].shape[1],
           "what": "per-sample mean squared error and max |error| of the denoising prediction, averaged over samples"}
    for k, parts in curves.items():
        curve = torch.cat(parts).double().mean(0)
        tenth = max(1, len(curve) // 10)
        out[k] = {"first": float(curve[:tenth].mean()), "last": float(curve[-tenth:].mean()),
                  "curve": [round(float(v), 6) for v in curve]}
    return out
