"""``cao2 compare``: a distilled set against a random real subset of the same size, under each protocol.

Both sets are scored by ``cao2 eval`` with the same student, epochs, batch, repeats and seeds, by default under
``hard`` labels and under ``rded`` soft labels (a teacher, by default the dataset's judge, relabels every
augmented crop). One table gives both figures and their difference per protocol, and one sentence, written from
the measured numbers, says what they mean. Each evaluation is a complete ``cao2 eval`` report in
``OUT/<distilled|random-real>-<protocol>/``; a rerun reuses those whose data and command are unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
from pathlib import Path

from ..errors import UserError
from ..store.layout import EVAL_FOLDER

FORMAT = "cao2-compare/1"
REPORT, TABLE = "compare.json", "compare.md"
MARKER = "compare-key.json"  # beside each eval.json: the data and eval command it scored
SETS = ("distilled", "random-real")
FOLDER = "compare"          # its default place: OUT/eval/compare/ of a run

# `cao2 eval` options passed to all four evaluations (flag, type, help); --train goes to the baseline only
PASSED = (
    ("--dataset", str, "label space, as `cao2 eval --dataset` (default: the run's)"),
    ("--val", str, "real held-out images (ImageNet val layout); MNIST: the built-in 10k test split"),
    ("--mnist-split", str, "MNIST: the held-out split students are tested on, test or val (default: test)"),
    ("--train", str, "real training images the random subsets are drawn from; MNIST: the built-in train split"),
    ("--student", str, "student architecture (default: convnet3 for MNIST, resnet18 else)"),
    ("--teacher", str, "soft-label teacher (default: the embedded MNIST judge, resnet18.tv_in1k for ImageNet)"),
    ("--teacher-arch", str, "timm architecture of a --teacher checkpoint that does not name it"),
    ("--teacher-classes", str, "file of the teacher's class ids in output order"),
    ("--epochs", int, "training epochs of every student (default: eval's: 50 for MNIST, 300 else)"),
    ("--batch-size", int, "training batch size (default: 100)"),
    ("--repeat", int, "students per set and protocol, seeded alike (default: 1)"),
    ("--seed", int, "base seed of the students and of the random subsets (default: 0)"),
    ("--eval-every", int, "test every N epochs and after the last (default: eval's)"),
    ("--device", str, "auto, cpu, cuda, cuda:N (default: auto)"),
    ("--workers", int, "data-loading processes for on-disk folders (default: 0)"),
)
TEACHER_FLAGS = ("--teacher", "--teacher-arch", "--teacher-classes")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="score a distilled set and a random real subset of the same IPC, under hard and soft "
                        "labels, in one table",
        description="Train students on a distilled set and on random real subsets with as many images per class, "
                    "with the same budget under each protocol, and print one table: protocol, distilled, random "
                    "real, difference, and a sentence saying what the numbers mean. Writes OUT/compare.json, "
                    "OUT/compare.md and each evaluation's eval.json.")
    p.add_argument("--data", metavar="DIR", help="the distilled set: a `cao2 run` output or an ImageFolder with the "
                   "same number of images in every class")
    p.add_argument("--protocols", default="hard,rded",
                   help="comma-separated `cao2 eval` protocols: hard, rded, rded-faithful (default: hard,rded)")
    for flag, kind, help_text in PASSED:
        p.add_argument(flag, type=kind, help=help_text)
    p.add_argument("--out", metavar="DIR", help="folder for the reports (default: DIR/eval/compare for a cao2 run "
                   "output)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _protocols(text: str) -> list[str]:
    from ..evaluate.protocols import PROTOCOLS
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in PROTOCOLS]
    if bad or not names:
        raise UserError(f"--protocols {text!r}: {'unknown protocol ' + repr(bad[0]) if bad else 'names none'}; "
                        f"give a comma-separated list of {', '.join(PROTOCOLS)}")
    if len(set(names)) != len(names):
        raise UserError(f"--protocols {text!r} names a protocol twice; list each once")
    return names


def _teacher_name(args, mnist: bool) -> str:
    from ..data.classifiers import DEFAULT_IMAGENET_CLASSIFIER
    if args.teacher:
        return args.teacher
    return "the embedded MNIST judge" if mnist else DEFAULT_IMAGENET_CLASSIFIER


def eval_argvs(args, ipc: int, dataset: str, classes: str | None, out: Path, protocol: str) -> dict[str, list[str]]:
    """The ``cao2 eval`` command lines of the distilled set and of the baseline under one protocol."""
    from ..evaluate.protocols import PROTOCOLS
    common = ["--protocol", protocol]
    for flag, _, _ in PASSED:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None or flag in ("--dataset", "--train") or (flag in TEACHER_FLAGS
                                                                and not PROTOCOLS[protocol].soft):
            continue
        common += [flag, str(value)]
    if args.quiet:
        common.append("--quiet")
    distilled = ["eval", "--data", str(args.data), *(["--dataset", args.dataset] if args.dataset else [])]
    real = ["eval", "--random-real", str(ipc), "--dataset", dataset, *(["--classes", classes] if classes else []),
            *(["--train", args.train] if args.train else [])]
    return {"distilled": [*distilled, *common, "--out", str(out / f"distilled-{protocol}")],
            "random-real": [*real, *common, "--out", str(out / f"random-real-{protocol}")]}


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


def run(args, parse_eval) -> dict:
    """Score both sets under every protocol; returns the report (also written to OUT/compare.json).

    ``parse_eval(argv)`` turns an eval command line into the namespace ``cao2 eval`` takes.
    """
    from ..evaluate import data as D
    from ..evaluate.cli import _check_numbers, parse_as, preflight
    from ..evaluate.report import reuse_or_evaluate
    from ..store.files import write_files

    if not args.data:
        raise UserError("cao2 compare needs --data DIR: the distilled set to compare with random real images")
    protocols = _protocols(args.protocols)
    distilled = D.open_distilled(args.data, args.dataset, None)
    counts = {cid: len(files) for cid, files in distilled.images.items()}
    if len(set(counts.values())) != 1:
        (a, n), (b, m) = min(counts.items(), key=lambda kv: kv[1]), max(counts.items(), key=lambda kv: kv[1])
        raise UserError(f"--data {args.data} has {n} images in class {a} but {m} in class {b}; the random real "
                        "baseline needs one number of images per class")
    ipc = next(iter(counts.values()))
    space, full = distilled.space, distilled.full_space
    classes = ",".join(space.ids) if space.ids != full.ids else None
    if args.out:
        out = Path(args.out)
    elif distilled.is_run:
        out = distilled.root / EVAL_FOLDER / FOLDER
    else:
        raise UserError("pass --out DIR for the reports (only a cao2 run output has a default, DIR/eval/compare)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    argvs = {p: eval_argvs(args, ipc, full.name, classes, out, p) for p in protocols}
    parsed = {(p, kind): parse_as(parse_eval, argv) for p in protocols for kind, argv in argvs[p].items()}
    for p in protocols:             # every option is checked before the first student trains
        _check_numbers(parsed[p, "distilled"])      # the sets' command lines differ only in what they train on:
        preflight(parsed[p, "random-real"], space, full)    # student, teacher and folders are checked once

    data_key = _data_key(distilled)
    rows = []
    for p in protocols:
        reports = {}
        for kind in SETS:
            argv = argvs[p][kind]
            key = {"data": data_key if kind == "distilled" else None, "eval": argv[1:]}
            reports[kind] = reuse_or_evaluate(Path(argv[-1]), key, lambda: _evaluate(parsed[p, kind]), MARKER)
            h = reports[kind]["summary"]["headline"]
            print(f"   {kind}, {p}: {h['mean']:.2f} ± {h['std']:.2f} % ({Path(argv[-1]) / 'eval.json'})", flush=True)
        d, r = (reports[k]["summary"]["headline"] for k in SETS)
        rows.append({"protocol": p, "distilled": _figure(d), "random_real": _figure(r),
                     "difference": d["mean"] - r["mean"], "settings": reports["distilled"]["config"]["settings"],
                     "reports": {k: str(Path(argvs[p][k][-1]) / "eval.json") for k in SETS}})
    first = reports["distilled"]
    result = {"format": FORMAT, "data": str(distilled.root), "dataset": full.name, "classes": list(space.ids),
              "ipc": ipc, "teacher": _teacher_name(args, D.is_mnist(space)), "val": first["data"]["val"],
              "val_images": first["data"]["val_images"],
              "protocols": rows}
    result["sentence"] = sentence(result)
    write_files(out, {REPORT: (json.dumps(result, indent=2) + "\n").encode(),
                      TABLE: (table(result) + "\n").encode()})
    result["out"] = str(out)
    return result


def _evaluate(args) -> None:
    from ..evaluate.cli import main
    with contextlib.redirect_stdout(io.StringIO()):     # each evaluation's own table stays in its eval.json
        main(args)


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
    from ..evaluate.report import pm
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
             "", "| protocol | distilled | random real | difference |", "|---|---|---|---|"]
    names = {"hard": "hard labels", "rded": f"soft labels from {result['teacher']} (rded)",
             "rded-faithful": f"soft labels from {result['teacher']} (rded-faithful)"}
    for r in result["protocols"]:
        lines.append(f"| {names[r['protocol']]} | {_pm(r['distilled'])} | {_pm(r['random_real'])} | "
                     f"{r['difference']:+.2f} |")
    lines.append("")
    if "best-last-20%" in figures.values():
        lines.append("Figures: final-epoch accuracy; rded-faithful: RDED's, the best of the evaluations in the last "
                     "20% of training.")
    lines.append(result["sentence"])
    return "\n".join(lines)
