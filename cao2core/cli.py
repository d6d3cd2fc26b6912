"""``cao2`` command line: ``cao2 run`` distills, ``cao2 eval`` scores, ``cao2 plugins`` lists what is installed."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from dataclasses import MISSING, fields

from . import __version__
from .studies import ablate
from .distill import distributed, presets
from .config import WORDS, RunConfig, base_type, load_toml
from .errors import UserError
from .studies import compare
from .evaluate.cli import add_parser as add_eval_parser
from .evaluate.cli import main as eval_main


def _flag(name: str) -> str:
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


def _add_run_flags(p: argparse.ArgumentParser, command: str = "run") -> None:
    p.add_argument("--config", metavar="FILE", help="TOML file whose keys are these flag names; flags override it")
    p.add_argument("--preset", metavar="NAME", help="settings of the official code for a dataset (`cao2 presets`); "
                   "the config file and flags override it")
    for f in fields(RunConfig):
        meta = f.metadata
        if command not in meta["commands"]:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = meta["help"] if default in (None, []) else f"{meta['help']} (default: {default})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if meta.get("nargs") == "append_kv":
            p.add_argument(_flag(f.name), action="append", metavar="KEY=VALUE", **kw)
        else:
            if meta.get("parse") in WORDS:
                p.add_argument(_flag(f.name), type=count_or(WORDS[meta["parse"]]), **kw)
                continue
            if meta.get("parse") == "dry_run":
                p.add_argument(_flag(f.name), type=int, nargs="?", const=1, metavar="RANKS", **kw)
                continue
            base = base_type(f)
            if base == "bool":
                p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
                continue
            p.add_argument(_flag(f.name), type={"int": int, "float": float}.get(base, str),
                           choices=meta.get("choices"), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cao2", description="Dataset distillation with pretrained generators (CaO2).")
    parser.add_argument("--version", action="version", version=f"cao2 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback behind an error (or CAO2_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="distill a dataset", description="Sample a pool per class, select (OSS), "
                           "optimize the latents (CLO), decode and write the distilled set.")
    _add_run_flags(run_p)
    plugins_p = sub.add_parser("plugins", help="list installed generator and other plugins with their hooks")
    plugins_p.add_argument("--verbose", "-v", action="store_true", help="also each generator's --gen-opt keys")
    sub.add_parser("presets", help="list the --preset settings with the paper's reported accuracy")
    add_eval_parser(sub)
    ablate_p = sub.add_parser("ablate", help="run and score the four OSS/CLO variants (paper-style ablation)",
                              description="Run `cao2 run` four times on the same seeds (pool, OSS only, CLO only, "
                              "OSS + CLO), score each with `cao2 eval` and print the ablation table; writes "
                              "OUT/<variant>/, OUT/ablation.json and OUT/ablation.png.")
    _add_run_flags(ablate_p)
    refine_p = sub.add_parser("refine", help="apply CaO2 to an existing set of images (plug-and-play)",
                              description="Encode the images of a class-folder tree with the generator's VAE, "
                              "select (OSS) when a class has more than --ipc images, optimize the latents (CLO), "
                              "decode and write them as `cao2 run` does.")
    _add_run_flags(refine_p, "refine")
    ablate.add_eval_flags(ablate_p)
    sweep_p = sub.add_parser("sweep", help="run, measure and score a grid of run options on shared seeds",
                             description="Run `cao2 run` at every point of a grid of flag values (--grid, "
                             "repeatable; the points are their product), all on the same seeds, measure how far "
                             "CLO moved each point's latents and images, score each point with `cao2 eval` "
                             "unless --no-eval, and write OUT/<point>/, OUT/sweep.json, OUT/sweep.md and "
                             "OUT/sweep.png.")
    _add_run_flags(sweep_p)
    sweep_p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                         help="a `cao2 run` flag and its values, e.g. clo-lr=6e-4,1e-2,1e-1 (repeatable)")
    sweep_p.add_argument("--no-eval", dest="evaluate", action="store_false",
                         help="measure the points without training students; score chosen points later with "
                              "`cao2 eval --data OUT/<point>`")
    ablate.add_eval_flags(sweep_p)
    compare.add_parser(sub)
    return parser


def run_flag_actions() -> dict[str, argparse.Action]:
    """The ``cao2 run`` flag of each RunConfig field, to parse values as that flag does (``cao2 sweep --grid``)."""
    p = argparse.ArgumentParser(add_help=False)
    _add_run_flags(p)
    return {a.dest: a for a in p._actions}


def merge_gen_opts(earlier: list[str], later: list[str]) -> list[str]:
    """``--gen-opt KEY=VALUE`` lists of a preset, a config file and the flags, merged by key (the later wins), so
    adding an option on the command line keeps the preset's others."""
    merged = {item.partition("=")[0]: item for item in earlier}
    merged.update({item.partition("=")[0]: item for item in later})
    return list(merged.values())


def config_from_args(args: argparse.Namespace) -> RunConfig:
    preset = presets.get(args.preset) if getattr(args, "preset", None) else None
    toml = load_toml(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "config", "preset", "debug") and not k.startswith("eval_")}
    profile = flags.get("profile", toml.get("profile", preset.options.get("profile") if preset else None))
    values = preset.options_for(profile) if preset else {}
    for layer in (toml, flags):
        if "gen_opt" in layer and "gen_opt" in values:      # --gen-opt pairs merge by key: a later one wins
            layer = {**layer, "gen_opt": merge_gen_opts(values["gen_opt"], layer["gen_opt"])}
        values.update(layer)
    try:
        return RunConfig(**values)
    except TypeError as exc:
        raise UserError(f"bad configuration: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plugins":
            return _plugins(args.verbose)
        if args.command == "eval":
            return eval_main(args)
        if args.command == "presets":
            print(presets.table())
            return 0
        if args.command == "ablate":
            return _ablate(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "refine":
            cfg = config_from_args(args)
            if not cfg.images:
                raise UserError("cao2 refine needs --images DIR (one subfolder of images per class)")
            return _run(cfg)
        return _run(config_from_args(args))
    except UserError as exc:
        if getattr(args, "debug", False) or os.environ.get("CAO2_DEBUG", "") not in ("", "0"):
            raise
        print(f"cao2: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cao2: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


def _run(cfg: RunConfig) -> int:
    from .distill.engine import run# heavy imports only for the command that needs them
    try:
        result = run(cfg)
    finally:
        distributed.shutdown()
    if result.rank != 0:
        return 0
    if result.plan:
        print(result.plan)
        return 0
    print(f"{'refined' if cfg.images else 'distilled'} {result.written} classes "
          f"({len(result.completed) - result.written} already complete) into {result.out.resolve()}")
    if result.completed:
        print(f"  images:   {result.out / 'images'}  (ImageFolder)")
    if result.preview:
        print(f"  preview:  {result.out / 'preview.png'}")
    print(f"  manifest: {result.out / 'manifest.json'}")
    if result.failed:
        cid, reason = next(iter(result.failed.items()))
        raise UserError(f"{len(result.failed)} class(es) failed and were not written (class {cid}: {reason}); "
                        "rerun the same command to redo them")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    if "out" not in vars(args):
        args.out = "out/ablate"
    parser = build_parser()
    result = ablate.run(config_from_args(args), args, parser.parse_args)
    print()
    print(ablate.table(result))
    print("\nwrote " + ", ".join(str(Path(args.out) / f) for f in (ablate.REPORT, ablate.TABLE, ablate.CHART)))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .studies import sweep
    if "out" not in vars(args):
        args.out = "out/sweep"
    run_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("grid", "evaluate")})
    result = sweep.run(config_from_args(run_args), args, build_parser().parse_args, run_flag_actions())
    print()
    print(sweep.table(result))
    print("\nwrote " + ", ".join(str(Path(args.out) / f) for f in (sweep.REPORT, sweep.TABLE, sweep.CHART)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    result = compare.run(args, build_parser().parse_args)
    print()
    print(compare.table(result))
    print("\nwrote " + ", ".join(str(Path(result["out"]) / f) for f in (compare.REPORT, compare.TABLE)))
    return 0


def _plugins(verbose: bool = False) -> int:
    from .generators.host import Host
    host = Host()
    for info in host.describe():
        print(f"{info.name} {info.version} [{info.kind}]" + (f" from {info.distribution}" if info.distribution else ""))
        print("  hooks: " + ", ".join(h.removeprefix("cao2_") for h in info.hooks))
        if verbose and info.options:
            print("  --gen-opt keys:")
            for key, opt in sorted(info.options.items()):
                choices = f" ({'|'.join(opt.choices)})" if opt.choices else ""
                print(f"    {key}{choices}: {opt.help} [default: {opt.default}]")
    for name, reason in sorted(host.broken.items()):
        print(f"{name} [generator, BROKEN]")
        print(f"  {reason}")
    if verbose:
        print("generic flags read by only some generators: --timestep-convention (dit), --sampler (dit, sd); "
              "--profile reference changes what each generator's docs say")
    return 0


if __name__ == "__main__":
    sys.exit(main())
