"""``cao2`` command line: argv -> the API (``cao2core.api``). The only module that parses arguments.

Each subcommand's flags come from the configuration tables (``RunConfig`` for run/refine/ablate/sweep,
``EvalConfig`` for eval and the students of compare/ablate/sweep), so a flag, a ``--config`` TOML key and an API
keyword are one name. Building the parser and printing help import no torch.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields

from . import __version__
from .config import COUNT_WORDS, EvalConfig, RunConfig, base_type, resolve_run_config
from .errors import UserError


class BadArguments(Exception):
    """A command line argparse cannot read: ``main`` prints it as one line with a --help hint."""

    def __init__(self, message: str, prog: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (``main`` prints it), not the whole usage block."""

    def error(self, message: str):
        raise BadArguments(message, self.prog)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def count_or(word: str):
    """An argparse type: an integer, or ``word`` (``--ipc all``, ``--batch-size auto``)."""
    def parse(text: str):
        if text == word:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {word!r}, got {text!r}") from None
    return parse


VALUE_TYPES = {"int": int, "float": float}


def add_run_flags(parser: argparse.ArgumentParser, command: str = "run") -> None:
    """The flags of ``command`` from RunConfig's table; unset flags stay out of the namespace, so a preset or a
    config file is overridden only by what was typed."""
    parser.add_argument("--config", metavar="FILE", action="append", help="TOML file whose keys are these flag names; "
                        "flags override it (one file)")
    parser.add_argument("--preset", metavar="NAME", help="settings of the official code for a dataset (`cao2 "
                        "presets`); the config file and flags override it")
    for f in fields(RunConfig):
        meta = f.metadata
        if command not in meta["commands"]:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = meta["help"] if default in (None, []) else f"{meta['help']} (default: {default})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if meta.get("nargs") == "append_kv":
            parser.add_argument(flag_of(f.name), action="append", metavar="KEY=VALUE", **kw)
        elif meta.get("parse") in COUNT_WORDS:
            parser.add_argument(flag_of(f.name), type=count_or(COUNT_WORDS[meta["parse"]]), **kw)
        elif meta.get("parse") == "dry_run":
            parser.add_argument(flag_of(f.name), type=int, nargs="?", const=1, metavar="RANKS", **kw)
        elif base_type(f) == "bool":
            parser.add_argument(flag_of(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag_of(f.name), type=VALUE_TYPES.get(base_type(f), str), choices=meta.get("choices"),
                                **kw)


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    """``cao2 eval``'s flags from EvalConfig's table, in its help groups."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(EvalConfig):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kw = dict(dest=f.name, default=f.default, help=meta["help"])
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if base_type(f) == "bool":
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            group.add_argument(flag_of(f.name), action=action, **kw)
        else:
            group.add_argument(flag_of(f.name), type=VALUE_TYPES.get(base_type(f), str), choices=meta.get("choices"),
                               **kw)


# the students' options of `cao2 ablate` and `cao2 sweep` (EvalConfig field, type, help), kept apart from the run's
# options as eval_<field>; the rest keep eval's defaults
STUDY_EVAL_FLAGS = (
    ("protocol", str, "evaluation protocol: hard, rded or rded-faithful (default: hard)"),
    ("student", str, "student architecture (default: convnet3 for MNIST, resnet18 else)"),
    ("epochs", int, "student training epochs (default: eval's)"),
    ("repeat", int, "students per variant (sweep: per point), seeded alike across them (default: 3)"),
    ("eval_every", int, "test every N epochs (default: eval's)"),
    ("val", str, "real held-out images (ImageNet val layout); MNIST: built in"),
    ("mnist_split", str, "MNIST: the held-out split students are tested on, test or val (default: test)"),
    ("teacher", str, "rded protocols: the soft-label teacher (default: eval's)"),
    ("seed", int, "seed of the students (default: 0)"),
)

# `cao2 compare`: the EvalConfig fields passed to all its evaluations (field, type, help); train feeds the baseline
COMPARE_EVAL_FLAGS = (
    ("dataset", str, "label space, as `cao2 eval --dataset` (default: the run's)"),
    ("val", str, "real held-out images (ImageNet val layout); MNIST: the built-in 10k test split"),
    ("mnist_split", str, "MNIST: the held-out split students are tested on, test or val (default: test)"),
    ("train", str, "real training images the random subsets are drawn from; MNIST: the built-in train split"),
    ("student", str, "student architecture (default: convnet3 for MNIST, resnet18 else)"),
    ("teacher", str, "soft-label teacher (default: the embedded MNIST judge, resnet18.tv_in1k for ImageNet)"),
    ("teacher_arch", str, "timm architecture of a --teacher checkpoint that does not name it"),
    ("teacher_classes", str, "file of the teacher's class ids in output order"),
    ("epochs", int, "training epochs of every student (default: eval's: 50 for MNIST, 300 else)"),
    ("batch_size", int, "training batch size (default: 100)"),
    ("repeat", int, "students per set and protocol, seeded alike (default: 1)"),
    ("seed", int, "base seed of the students and of the random subsets (default: 0)"),
    ("eval_every", int, "test every N epochs and after the last (default: eval's)"),
    ("device", str, "auto, cpu, cuda, cuda:N (default: auto)"),
    ("workers", int, "data-loading processes for on-disk folders (default: 0)"),
)


def study_dest(name: str) -> str:
    """``epochs`` -> ``eval_epochs``: a study's student option, apart from the run option of the same name."""
    return "eval_" + name.removeprefix("eval_")


def add_study_eval_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation of each variant or point (as `cao2 eval`)")
    for name, kind, help_text in STUDY_EVAL_FLAGS:
        flag = "--eval-seed" if name == "seed" else flag_of(name)
        group.add_argument(flag, type=kind, default=None, help=help_text, dest=study_dest(name),
                           metavar=flag.removeprefix("--").replace("-", "_").upper())


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cao2", description="Dataset distillation with pretrained generators (CaO2).")
    parser.add_argument("--version", action="version", version=f"cao2 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback behind an error (or CAO2_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="distill a dataset", description="Sample a pool per class, select (OSS), "
                           "optimize the latents (CLO), decode and write the distilled set.")
    add_run_flags(run_p)
    plugins_p = sub.add_parser("plugins", help="list installed generator and other plugins with their hooks")
    plugins_p.add_argument("--verbose", "-v", action="store_true", help="also each generator's --gen-opt keys")
    sub.add_parser("presets", help="list the --preset settings with the paper's reported accuracy")
    eval_p = sub.add_parser(
        "eval", help="score a distilled set: train a student on it, test on real held-out data",
        description="Train a fresh student on a distilled set (or a real baseline) and report its test accuracy "
                    "on real held-out data: mean ± std of the final epoch over --repeat seeds.")
    add_eval_flags(eval_p)
    ablate_p = sub.add_parser("ablate", help="run and score the four OSS/CLO variants (paper-style ablation)",
                              description="Run `cao2 run` four times on the same seeds (pool, OSS only, CLO only, "
                              "OSS + CLO), score each with `cao2 eval` and print the ablation table; writes "
                              "OUT/<variant>/, OUT/ablation.json and OUT/ablation.png.")
    add_run_flags(ablate_p)
    add_study_eval_flags(ablate_p)
    refine_p = sub.add_parser("refine", help="apply CaO2 to an existing set of images (plug-and-play)",
                              description="Encode the images of a class-folder tree with the generator's VAE, "
                              "select (OSS) when a class has more than --ipc images, optimize the latents (CLO), "
                              "decode and write them as `cao2 run` does.")
    add_run_flags(refine_p, "refine")
    sweep_p = sub.add_parser("sweep", help="run, measure and score a grid of run options on shared seeds",
                             description="Run `cao2 run` at every point of a grid of flag values (--grid, "
                             "repeatable; the points are their product), all on the same seeds, measure how far "
                             "CLO moved each point's latents and images, score each point with `cao2 eval` "
                             "unless --no-eval, and write OUT/<point>/, OUT/sweep.json, OUT/sweep.md and "
                             "OUT/sweep.png.")
    add_run_flags(sweep_p)
    sweep_p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                         help="a `cao2 run` flag and its values, e.g. clo-lr=6e-4,1e-2,1e-1 (repeatable)")
    sweep_p.add_argument("--no-eval", dest="evaluate", action="store_false",
                         help="measure the points without training students; score chosen points later with "
                              "`cao2 eval --data OUT/<point>`")
    add_study_eval_flags(sweep_p)
    compare_p = sub.add_parser(
        "compare", help="score a distilled set and a random real subset of the same IPC, under hard and soft "
                        "labels, in one table",
        description="Train students on a distilled set and on random real subsets with as many images per class, "
                    "with the same budget under each protocol, and print one table: protocol, distilled, random "
                    "real, difference, and a sentence saying what the numbers mean. Writes OUT/compare.json, "
                    "OUT/compare.md and each evaluation's eval.json.")
    compare_p.add_argument("--data", metavar="DIR", help="the distilled set: a `cao2 run` output or an ImageFolder "
                           "with the same number of images in every class")
    compare_p.add_argument("--protocols", default="hard,rded",
                           help="comma-separated `cao2 eval` protocols: hard, rded, rded-faithful (default: hard,rded)")
    for name, kind, help_text in COMPARE_EVAL_FLAGS:
        compare_p.add_argument(flag_of(name), type=kind, help=help_text)
    compare_p.add_argument("--out", metavar="DIR", help="folder for the reports (default: DIR/eval/compare for a cao2 "
                           "run output)")
    compare_p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ddr = compare_p.add_argument_group("DD-Ranking's scores (IOR, HLR, DDRS; docs/studies.md)")
    ddr.add_argument("--full-real-acc", type=float, metavar="ACC", help="the full training set's hard-label test "
                     "accuracy (%%) with this student, for HLR")
    ddr.add_argument("--full-real", action="store_true", help="measure that accuracy: train the students on the whole "
                     "real training set (hard labels)")
    ddr.add_argument("--ddrs-weight", type=float, default=0.5, metavar="W", help="w of IOR in DDRS (default: 0.5, "
                     "DD-Ranking's leaderboard)")
    export_p = sub.add_parser("export", help="write a finished run as a Hugging Face dataset, RDED folders or tensors",
                              description="Write the distilled set of a finished `cao2 run` into a new or empty "
                              "folder in the layout another tool reads (docs/share.md).")
    export_p.add_argument("data", metavar="OUT", help="the run folder (`cao2 run --out`)")
    export_p.add_argument("--format", required=True, choices=("hf", "rded", "tensors"),
                          help="hf: a `datasets` imagefolder with metadata.jsonl and a dataset card; rded: numeric "
                               "class folders and class_map.txt; tensors: images.pt and labels.pt (DD-Ranking)")
    export_p.add_argument("--to", required=True, metavar="DIR", help="a new or empty folder outside the run")
    export_p.add_argument("--push", metavar="REPO", help="hf: upload the export to this Hub dataset repository "
                          "(needs a token: huggingface-cli login or HF_TOKEN)")
    report_p = sub.add_parser("report", help="write a static HTML page of a finished run (OUT/report/index.html)",
                              description="One self-contained page of a finished `cao2 run`: what was run, each "
                              "class before and after CLO, the judge's confidence, CLO's loss curves and the "
                              "evaluations found (docs/share.md).")
    report_p.add_argument("data", metavar="OUT", help="the run folder (`cao2 run --out`)")
    report_p.add_argument("--device", default="auto", help="where the run's generator decodes the latents before "
                          "CLO (default: auto)")
    return parser


def run_flag_actions() -> dict[str, argparse.Action]:
    """The ``cao2 run`` flag of each RunConfig field, to parse ``--grid`` values as that flag does."""
    parser = argparse.ArgumentParser(add_help=False)
    add_run_flags(parser)
    return {a.dest: a for a in parser._actions}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a run command's flags: defaults < --preset < --config file < flags typed."""
    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "command_line", "config", "preset", "debug", "grid", "evaluate")
             and not k.startswith("eval_")}
    files = getattr(args, "config", None) or []
    if len(files) > 1:
        raise UserError(f"--config is given {len(files)} times ({', '.join(files)}); give one file (merge them "
                        "into one, or put the differences on the command line as flags)")
    command = "refine" if args.command == "refine" else "run"
    return resolve_run_config(getattr(args, "preset", None), files[0] if files else None, command, **flags)


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(**{f.name: getattr(args, f.name) for f in fields(EvalConfig)})


def study_eval_config(args: argparse.Namespace, run: RunConfig) -> EvalConfig:
    """The students of ``cao2 ablate`` and ``cao2 sweep``: the eval_* flags given, else 3 quiet students on the
    runs' device, seed 0."""
    given = {name: getattr(args, study_dest(name)) for name, _, _ in STUDY_EVAL_FLAGS
             if getattr(args, study_dest(name)) is not None}
    return EvalConfig(**{"repeat": 3, "device": run.device, "quiet": True, **given})


def compare_settings(args: argparse.Namespace) -> EvalConfig:
    given = {name: getattr(args, name) for name, _, _ in COMPARE_EVAL_FLAGS if getattr(args, name) is not None}
    return EvalConfig(quiet=args.quiet, **given)


TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_grid(items: list[str]):
    """``--grid KEY=V1,V2,...`` items -> the sweep's axes, each value parsed as its ``cao2 run`` flag parses it."""
    from .studies.sweep import FIELDS, Axis
    actions = run_flag_actions()
    axes = []
    for item in items:
        key, sep, rest = item.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        flag = name.replace("_", "-")
        if not sep or not name or not rest.strip():
            raise UserError(f"--grid {item!r} is not KEY=V1,V2,...; e.g. --grid clo-lr=6e-4,1e-2,1e-1")
        if name not in FIELDS or name not in actions:
            raise UserError(f"--grid {item!r}: {key.strip()!r} is not a `cao2 run` flag; use a flag name such as "
                            "clo-lr, clo-iters, clo-tmax or condition")
        texts = tuple(t.strip() for t in rest.split(","))
        if not all(texts):
            raise UserError(f"--grid {item!r} has an empty value; separate the values with single commas")
        if FIELDS[name].metadata.get("nargs") == "append_kv":
            values = texts
        else:
            values = tuple(grid_value(actions[name], flag, t) for t in texts)
        axes.append(Axis(name, values, texts))
    return axes


def grid_value(action: argparse.Action, flag: str, text: str):
    if isinstance(action, argparse.BooleanOptionalAction):
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise UserError(f"--grid {flag}: {text!r} is not a switch value; use true or false")
    if action.type is None:
        value = text
    else:
        try:
            value = action.type(text)
        except argparse.ArgumentTypeError as exc:
            raise UserError(f"--grid {flag}: {exc}") from None
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(action.type, "a valid value")
            raise UserError(f"--grid {flag}: {text!r} is not {kind}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"--grid {flag}: {text!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BadArguments as exc:
        words = sys.argv[1:] if argv is None else argv
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        command = next((w for w in words if w in commands), None)
        prog = exc.prog if exc.prog != "cao2" or command is None else f"cao2 {command}"
        print(f"cao2: error: {' '.join(str(exc).split())}; run `{prog} --help` for its options", file=sys.stderr)
        return 2
    args.command_line = " ".join(["cao2", *(sys.argv[1:] if argv is None else argv)])
    try:
        return dispatch(args)
    except UserError as exc:
        if getattr(args, "debug", False) or os.environ.get("CAO2_DEBUG", "") not in ("", "0"):
            raise
        print(f"cao2: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cao2: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; bad input raises UserError (``main`` prints it as one line)."""
    if args.command == "plugins":
        return show_plugins(args.verbose)
    if args.command == "presets":
        from .method import presets
        print(presets.table())
        return 0
    if args.command == "eval":
        return evaluate_command(args)
    if args.command == "ablate":
        return ablate_command(args)
    if args.command == "sweep":
        return sweep_command(args)
    if args.command == "compare":
        return compare_command(args)
    if args.command == "export":
        return export_command(args)
    if args.command == "report":
        return report_command(args)
    if args.command == "refine":
        config = config_from_args(args)
        if not config.images:
            raise UserError("cao2 refine needs --images DIR (one subfolder of images per class)")
        return distill_command(config)
    return distill_command(config_from_args(args))


def distill_command(config: RunConfig) -> int:
    from .api import distill
    result = distill(config)
    if result.rank != 0:
        return 0
    if result.plan:
        print(result.plan)
        return 0
    print(f"{'refined' if config.images else 'distilled'} {result.written} classes "
          f"({len(result.completed) - result.written} already complete) into {result.out.resolve()}")
    if result.completed:
        print(f"  images:   {result.images}  (ImageFolder)")
    if result.preview:
        print(f"  preview:  {result.out / 'preview.png'}")
    print(f"  manifest: {result.manifest}")
    if result.failed:
        cid, reason = next(iter(result.failed.items()))
        raise UserError(f"{len(result.failed)} class(es) failed and were not written (class {cid}: {reason}); "
                        "rerun the same command to redo them")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from .scoring.evaluation import evaluate
    result = evaluate(eval_config_from_args(args), command=getattr(args, "command_line", None))
    print(result.table())
    print()
    for path in result.files:
        print(f"wrote {path}")
    return 0


def ablate_command(args: argparse.Namespace) -> int:
    from .api import ablate
    if "out" not in vars(args):
        args.out = "out/ablate"
    config = config_from_args(args)
    result = ablate(config, study_eval_config(args, config))
    print()
    print(result.table())
    print("\nwrote " + ", ".join(str(path) for path in result.files))
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from .studies.sweep import sweep
    if "out" not in vars(args):
        args.out = "out/sweep"
    config = config_from_args(args)
    axes = parse_grid(args.grid or [])
    if args.evaluate:
        settings = study_eval_config(args, config)
    else:
        extra = [("--eval-seed" if name == "seed" else flag_of(name)) for name, _, _ in STUDY_EVAL_FLAGS
                 if getattr(args, study_dest(name)) is not None]
        if extra:
            raise UserError(f"{extra[0]} sets how the points are scored, but --no-eval scores none; drop one of them")
        settings = None
    given = {k for k in vars(args) if k in RunConfig.__dataclass_fields__}
    result = sweep(config, axes, settings, given)
    print()
    print(result.table())
    print("\nwrote " + ", ".join(str(path) for path in result.files))
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from .studies.compare import check_protocols, compare
    protocols = check_protocols([t.strip() for t in args.protocols.split(",") if t.strip()], args.protocols)
    result = compare(args.data, protocols, compare_settings(args), args.out, args.full_real_acc, args.full_real,
                     args.ddrs_weight)
    print()
    print(result.table())
    print("\nwrote " + ", ".join(str(path) for path in result.files))
    return 0


def export_command(args: argparse.Namespace) -> int:
    from .api import export
    result = export(args.data, args.format, args.to, args.push)
    print(f"wrote {result.images} images as {result.format} into {result.out}"
          + (f"; uploaded to https://huggingface.co/datasets/{result.pushed}" if result.pushed else ""))
    return 0


def report_command(args: argparse.Namespace) -> int:
    from .api import report
    result = report(args.data, args.device)
    print(f"wrote {result.page} ({result.classes} classes, {result.thumbnails} images before CLO)")
    return 0


def show_plugins(verbose: bool = False) -> int:
    from .generators.host import Host
    host = Host()
    for info in host.describe():
        print(f"{info.name} {info.version} [{info.kind}]" + (f" from {info.distribution}" if info.distribution else ""))
        print("  hooks: " + ", ".join(h.removeprefix("cao2_") for h in info.hooks))
        if verbose:
            print(f"  contract: {'.'.join(map(str, info.contract))}")
        if verbose and info.options:
            print("  --gen-opt keys:")
            for key, opt in sorted(info.options.items()):
                choices = f" ({'|'.join(opt.choices)})" if opt.choices else ""
                print(f"    {key}{choices}: {opt.help} [default: {opt.default}]")
    for name, reason in sorted(host.broken.items()):
        print(f"{name} [{'plugin' if name in host.broken_cross_cutting else 'generator'}, BROKEN]")
        print(f"  {reason}")
    if verbose:
        print("generic flags read by only some generators: --timestep-convention (dit), --sampler (dit, sd, sit); "
              "--profile reference changes what each generator's docs say")
    return 0


if __name__ == "__main__":
    sys.exit(main())
