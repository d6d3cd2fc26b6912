"""``cao2 compare``: a distilled set against a random real subset of the same size, under each protocol.

Both sets are scored by ``cao2 eval`` with the same student, epochs, batch, repeats and seeds, by default under
``hard`` labels and under ``rded`` soft labels (a teacher, by default the dataset's judge, relabels every
augmented crop). One table gives both figures and their difference per protocol, and one sentence, written from
the measured numbers, says what they mean. Each evaluation is a complete ``cao2 eval`` report in
``OUT/<distilled|random-real>-<protocol>/``; a rerun reuses those whose data and command are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import PROTOCOLS, EvalConfig
from ..errors import UserError
from ..outputs import check_apart, check_writable
from ..store.layout import EVAL_FOLDER
from . import ddranking

FORMAT = "cao2-compare/1"
REPORT, TABLE = "compare.json", "compare.md"
MARKER = "compare-key.json"  # beside each eval.json: the data and eval command it scored
SETS = ("distilled", "random-real")
FULL_SET = "full-real"      # OUT/full-real-hard/: the full-data ceiling that DD-Ranking's HLR is measured against
FOLDER = "compare"          # its default place: OUT/eval/compare/ of a run
DEFAULT_PROTOCOLS = ("hard", "rded")



@dataclass
class CompareResult:
    """Both sets' scores under each protocol: ``report`` is compare.json; ``difference`` the distilled set's
    figure minus the random subset's, per protocol (percentage points)."""

    report: dict
    out: Path
    files: list[Path]

    @property
    def difference(self) -> dict[str, float]:
        return {row["protocol"]: row["difference"] for row in self.report["protocols"]}

    @property
    def ddranking(self) -> dict[str, dict] | None:
        """DD-Ranking's IOR, HLR (percentage points) and DDRS per protocol; None without a full-data accuracy."""
        if "ddranking" not in self.report:
            return None
        return {r["protocol"]: {k: r[k] for k in ("ior", "hlr", "ddrs")} for r in self.report["protocols"]}

    @property
    def sentence(self) -> str:
        return self.report["sentence"]

    def table(self) -> str:
        return table(self.report)


def check_protocols(names: list[str], given: str | None = None) -> list[str]:
    """The protocols to compare under, checked (known, each once); ``given``: how the user wrote them."""
    shown = given if given is not None else ",".join(names)
    bad = [n for n in names if n not in PROTOCOLS]
    if bad or not names:
        raise UserError(f"--protocols {shown!r}: {'unknown protocol ' + repr(bad[0]) if bad else 'names none'}; "
                        f"give a comma-separated list of {', '.join(PROTOCOLS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--protocols {shown!r} names a protocol twice; list each once")
    return list(names)


def _teacher_name(settings: EvalConfig, mnist: bool) -> str:
    from ..data.classifiers import DEFAULT_IMAGENET_CLASSIFIER
    if settings.teacher:
        return settings.teacher
    return "the embedded MNIST judge" if mnist else DEFAULT_IMAGENET_CLASSIFIER


def evaluations(settings: EvalConfig, data: str, ipc: int, dataset: str, classes: str | None, out: Path,
                protocol: str) -> dict[str, EvalConfig]:
    """The evaluations of the distilled set and of the random real baseline under one protocol: the same student,
    budget and seeds; ``settings.train`` feeds only the baseline, a teacher only the soft protocols."""
    from ..scoring.protocols import PROTOCOLS as PROTOCOL_TABLE
    soft = PROTOCOL_TABLE[protocol].soft
    common = replace(settings, protocol=protocol, data=None, random_real=None, full_real=False, out=None,
                     classes=None, train=None, plot=False,
                     **({} if soft else {"teacher": None, "teacher_arch": None, "teacher_classes": None}))
    return {"distilled": replace(common, data=str(data), out=str(out / f"distilled-{protocol}")),
            "random-real": replace(common, random_real=ipc, dataset=dataset, classes=classes, train=settings.train,
                                   out=str(out / f"random-real-{protocol}"))}


def _data_key(distilled) -> dict:
    """What identifies the distilled set's content: a run's id, else the listing of its image files."""
    if distilled.is_run:
        return {"run_id": distilled.info.get("run_id")}
    digest = hashlib.sha256()
    for cid in sorted(distilled.images):
        for path in distilled.images[cid]:
            st = path.stat()
            digest.update(f"{cid}/{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return {"files": digest.hexdigest()}


def check_full_real(protocols: list[str], full_real_acc: float | None, full_real: bool, weight: float) -> None:
    """The inputs of DD-Ranking's scores, checked: one source of the full-data accuracy, a percentage, the hard
    protocol among ``protocols`` (HLR is the hard-label gap) and a weight in [0, 1]."""
    if full_real_acc is not None and full_real:
        raise UserError("give --full-real-acc ACC or --full-real, not both: one full-data accuracy for DD-Ranking's "
                        "scores")
    if full_real_acc is not None and not (math.isfinite(full_real_acc) and 0 <= full_real_acc <= 100):
        raise UserError(f"--full-real-acc must be a test accuracy in percent (0 to 100), got {full_real_acc}")
    if (full_real_acc is not None or full_real) and "hard" not in protocols:
        raise UserError("DD-Ranking's HLR needs the distilled set's hard-label accuracy; add hard to --protocols")
    if not (math.isfinite(weight) and 0 <= weight <= 1):
        raise UserError(f"--ddrs-weight must be between 0 and 1, got {weight}")


def compare(data: str, protocols: list[str] = DEFAULT_PROTOCOLS, settings: EvalConfig | None = None,
            out: str | None = None, full_real_acc: float | None = None, full_real: bool = False,
            weight: float = ddranking.DEFAULT_WEIGHT) -> CompareResult:
    """Score the distilled set ``data`` and random real subsets of the same IPC under each protocol, with the
    students of ``settings`` (its data, out and protocol are set per evaluation; default: ``EvalConfig()``'s);
    writes OUT/compare.json and .md (``out``: default DATA/eval/compare for a cao2 run output). With a full-data
    hard-label accuracy (``full_real_acc`` in %, or ``full_real``: measured with the same students on the whole
    training set), each protocol also gets DD-Ranking's IOR, HLR and DDRS (``weight``: w of IOR)."""
    from ..scoring import data as eval_data
    from ..scoring.evaluation import check
    from ..scoring.report import reuse_or_evaluate
    from ..store.files import write_files

    if not data:
        raise UserError("cao2 compare needs --data DIR: the distilled set to compare with random real images")
    settings = settings if settings is not None else EvalConfig(quiet=True)
    protocols = check_protocols(list(protocols))
    check_full_real(protocols, full_real_acc, full_real, weight)
    distilled = eval_data.open_distilled(data, settings.dataset, None)
    counts = {cid: len(files) for cid, files in distilled.images.items()}
    if len(set(counts.values())) != 1:
        (a, n), (b, m) = min(counts.items(), key=lambda kv: kv[1]), max(counts.items(), key=lambda kv: kv[1])
        raise UserError(f"--data {data} has {n} images in class {a} but {m} in class {b}; the random real "
                        "baseline needs one number of images per class")
    ipc = next(iter(counts.values()))
    space, full = distilled.space, distilled.full_space
    classes = ",".join(space.ids) if space.ids != full.ids else None
    if out:
        out = Path(out)
    elif distilled.is_run:
        out = distilled.root / EVAL_FOLDER / FOLDER
    else:
        raise UserError("pass --out DIR for the reports (only a cao2 run output has a default, DIR/eval/compare)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    check_apart(data, "--data", out, "--out", distilled.root / EVAL_FOLDER if distilled.is_run else None)
    if settings.train:
        check_apart(settings.train, "--train", out, "--out")
    check_writable(out, "--out")
    planned = {p: evaluations(settings, data, ipc, full.name, classes, out, p) for p in protocols}
    for p in protocols:             # every option is checked before the first student trains
        planned[p]["distilled"].validate()          # the sets differ only in what they train on:
        check(planned[p]["random-real"], space, full)   # student, teacher and folders are checked once
    ceiling = None
    if full_real:
        ceiling = replace(planned["hard"]["random-real"], random_real=None, full_real=True,
                          out=str(out / f"{FULL_SET}-hard"))
        check(ceiling, space, full)

    data_key = _data_key(distilled)
    rows = []
    for p in protocols:
        reports = {}
        for kind in SETS:
            config = planned[p][kind]
            key = {"data": data_key if kind == "distilled" else None, "eval": config.to_argv()[1:]}
            reports[kind] = reuse_or_evaluate(Path(config.out), key, lambda: _evaluate(config), MARKER)
            h = reports[kind]["summary"]["headline"]
            print(f"   {kind}, {p}: {h['mean']:.2f} ± {h['std']:.2f} % ({Path(config.out) / 'eval.json'})",
                  flush=True)
        d, r = (reports[k]["summary"]["headline"] for k in SETS)
        rows.append({"protocol": p, "distilled": _figure(d), "random_real": _figure(r),
                     "difference": d["mean"] - r["mean"], "settings": reports["distilled"]["config"]["settings"],
                     "reports": {k: str(Path(planned[p][k].out) / "eval.json") for k in SETS}})
    if full_real:
        key = {"data": None, "eval": ceiling.to_argv()[1:]}
        report = reuse_or_evaluate(Path(ceiling.out), key, lambda: _evaluate(ceiling), MARKER)
        h = report["summary"]["headline"]
        print(f"   full real, hard: {h['mean']:.2f} ± {h['std']:.2f} % ({Path(ceiling.out) / 'eval.json'})", flush=True)
        full_acc = {"mean": h["mean"], "source": str(Path(ceiling.out) / "eval.json")}
    elif full_real_acc is not None:
        full_acc = {"mean": float(full_real_acc), "source": "given (--full-real-acc)"}
    else:
        full_acc = None
    if full_acc is not None:
        for row, figures in zip(rows, ddranking.scores(rows, full_acc["mean"], weight).values()):
            row.update(figures)
    first = reports["distilled"]
    result = {"format": FORMAT, "data": str(distilled.root), "dataset": full.name, "classes": list(space.ids),
              "ipc": ipc, "teacher": _teacher_name(settings, eval_data.is_mnist(space)), "val": first["data"]["val"],
              "val_images": first["data"]["val_images"],
              "protocols": rows}
    if full_acc is not None:
        result["ddranking"] = {"full_real_hard": full_acc, "weight": weight, "reference": ddranking.REFERENCE}
    result["sentence"] = sentence(result)
    files = write_files(out, {REPORT: (json.dumps(result, indent=2) + "\n").encode(),
                              TABLE: (table(result) + "\n").encode()})
    return CompareResult(result, out, files)


def _evaluate(config: EvalConfig) -> None:
    from ..scoring.evaluation import evaluate
    evaluate(config)        # each evaluation's own table stays in its eval.json


def _figure(headline: dict) -> dict:
    return {k: headline[k] for k in ("metric", "mean", "std", "values")}


def _where(protocol: str, teacher: str) -> str:
    return {"hard": "under hard labels",
            "rded": f"under soft labels ({teacher} relabels every crop)",
            "rded-faithful": f"under RDED's own evaluation (soft labels from {teacher})"}[protocol]


def sentence(result: dict) -> str:
    """What the measured numbers say, in one sentence (plus how sure they are)."""
    rows = result["protocols"]
    parts = []
    for r in rows:
        d = r["difference"]
        how = "level with" if abs(d) < 0.05 else f"{abs(d):.1f} points {'above' if d > 0 else 'below'}"
        parts.append(f"{_where(r['protocol'], result['teacher'])} the distilled set is {how} random real images")
    text = "; ".join(parts)
    above = {r["protocol"]: r["difference"] >= 0.05 for r in rows}
    below = {r["protocol"]: r["difference"] <= -0.05 for r in rows}
    soft = [p for p in above if p != "hard"]
    if len(rows) > 1:
        if all(above.values()):
            text += ", so at this budget it trains a better student than random real images under every protocol"
        elif all(below.values()):
            text += ", so at this budget random real images train a better student under every protocol"
        elif "hard" in above and below["hard"] and soft and all(above[p] for p in soft):
            text += (", so at this budget it beats random real images only when a teacher relabels the crops, the "
                     "protocol the paper's claims are made under")
        elif "hard" in above and above["hard"] and soft and all(below[p] for p in soft):
            text += ", so at this budget it beats random real images only under hard labels"
    text = text[0].upper() + text[1:] + "."
    repeats = len(rows[0]["distilled"]["values"])
    if repeats == 1:
        text += " One student per set and protocol, so the spread between seeds is not measured (--repeat measures it)."
    else:
        close = [r["protocol"] for r in rows
                 if abs(r["difference"]) <= r["distilled"]["std"] + r["random_real"]["std"]]
        if close:
            text += (f" The {' and '.join(close)} difference{'s are' if len(close) > 1 else ' is'} within the spread "
                     f"of the {repeats} students (std of the two sets added).")
    return text


def _pm(f: dict) -> str:
    from ..scoring.report import pm
    return f"{f['mean']:.2f}" if len(f["values"]) == 1 else pm(f)


def table(result: dict) -> str:
    """The verdict: one row per protocol, the budget in the header, the sentence under it."""
    st = result["protocols"][0]["settings"]
    repeats = len(result["protocols"][0]["distilled"]["values"])
    figures = {r["protocol"]: r["distilled"]["metric"] for r in result["protocols"]}
    lines = [f"Distilled set vs random real images, IPC {result['ipc']}, {len(result['classes'])} classes of "
             f"{result['dataset']}: {st['student']}, {st['epochs']} epoch{'s' if st['epochs'] > 1 else ''}, "
             f"batch {st['batch_size']}, "
             f"{repeats} student{'s' if repeats > 1 else ''} per set and protocol; test accuracy (%) on "
             f"{result['val']}, {result['val_images']} images",
             ""]
    dd = result.get("ddranking")
    if dd:
        lines += ["| protocol | distilled | random real | difference (IOR) | HLR | DDRS |", "|---|---|---|---|---|---|"]
    else:
        lines += ["| protocol | distilled | random real | difference |", "|---|---|---|---|"]
    names = {"hard": "hard labels", "rded": f"soft labels from {result['teacher']} (rded)",
             "rded-faithful": f"soft labels from {result['teacher']} (rded-faithful)"}
    for r in result["protocols"]:
        line = f"| {names[r['protocol']]} | {_pm(r['distilled'])} | {_pm(r['random_real'])} | {r['difference']:+.2f} |"
        if dd:
            line += f" {r['hlr']:+.2f} | {r['ddrs']:.3f} |"
        lines.append(line)
    lines.append("")
    if dd:
        lines.append(f"DD-Ranking ({dd['reference']}): IOR = distilled - random real under the protocol; HLR = "
                     f"full-data hard-label accuracy ({dd['full_real_hard']['mean']:.2f} %, "
                     f"{dd['full_real_hard']['source']}) - the distilled set's hard-label accuracy; "
                     f"DDRS = (exp(w IOR - (1-w) HLR) - 1/e) / (e - 1/e), w = {dd['weight']:g}, IOR and HLR as "
                     "fractions.")
    if "best-last-20%" in figures.values():
        lines.append("Figures: final-epoch accuracy; rded-faithful: RDED's, the best of the evaluations in the last "
                     "20% of training.")
    lines.append(result["sentence"])
    return "\n".join(lines)
