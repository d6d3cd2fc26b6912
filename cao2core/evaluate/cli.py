"""``cao2 eval``: the subcommand's flags (``add_parser``) and its entry point (``main``).

Register it in the top-level parser with ``add_parser(subparsers)`` and call ``main(args)`` for
``args.command == "eval"``; ``main`` raises ``cao2core.errors.UserError`` for bad input (the top-level CLI prints
it as one line) and writes nothing unless the whole evaluation succeeded.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import UserError

MNIST_DEFAULTS = {"student": "convnet3", "epochs": 50, "batch_size": 100, "eval_every": 50}
IMAGENET_DEFAULTS = {"student": "resnet18", "epochs": 300, "batch_size": 100, "eval_every": 10}
OPTIMIZER_DEFAULTS = {"adamw": (1e-3, 0.01), "sgd": (0.01, 5e-4)}   # (lr, weight decay)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object and return its parser."""
    p = subparsers.add_parser(
        "eval", help="score a distilled set: train a student on it, test on real held-out data",
        description="Train a fresh student on a distilled set (or a real baseline) and report its test accuracy "
                    "on real held-out data: mean ± std of the final epoch over --repeat seeds.")
    what = p.add_argument_group("what to evaluate (one of)")
    what.add_argument("--data", metavar="DIR", help="distilled set: a `cao2 run` output (manifest.json + images/) "
                      "or an ImageFolder (DIR/<class id>/*.png)")
    what.add_argument("--random-real", metavar="IPC", type=int,
                      help="baseline: IPC random real images per class from --train (MNIST: the built-in train split); "
                           "a new seeded subset per repeat")
    what.add_argument("--full-real", action="store_true", help="baseline: the whole real training set (the ceiling)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", help="label space: mnist, nette, woof, in100, in1k or a file of wnids; default: the "
                      "run's (cao2 output) or the one whose class ids are the folder names")
    data.add_argument("--val", metavar="DIR", help="real held-out images, DIR/<wnid>/*.JPEG (ImageNet val layout); "
                      "default for MNIST: the built-in 10k test split")
    data.add_argument("--mnist-split", choices=("test", "val"), default="test",
                      help="MNIST: the built-in held-out split students are tested on: test (report figures) or val "
                           "(the 10k validation split held out from train: choose settings on it) (default: test)")
    data.add_argument("--train", metavar="DIR", help="real training images for --random-real / --full-real "
                      "(default for MNIST: the built-in 50k train split)")
    data.add_argument("--classes", help="--random-real / --full-real: only these classes of --dataset (ids or "
                      "positions, A-B ranges, as `cao2 run --classes`), to match a run distilled with --classes; "
                      "default: all")
    data.add_argument("--class-map", metavar="FILE", help="rename class folders: one 'FOLDER CLASS_ID' per line "
                      "(e.g. RDED's 00000..00009 folders)")
    data.add_argument("--image-size", type=int, help="student input size for ImageNet label spaces (default: 224); "
                      "MNIST is 32")
    data.add_argument("--workers", type=int, default=0, help="data-loading processes for on-disk folders (default: 0)")
    train = p.add_argument_group("training")
    train.add_argument("--protocol", choices=("hard", "rded", "rded-faithful"), default="hard",
                       help="hard: CE on labels; rded: teacher soft labels (KL, T^2), full cosine, final epoch; "
                            "rded-faithful: RDED/CaO2's quirks (default: hard)")
    train.add_argument("--student", help="timm architecture or convnet3 (default: convnet3 for MNIST, resnet18 else)")
    train.add_argument("--teacher", help="rded: a timm model name or a local checkpoint (default: the embedded MNIST "
                       "judge, resnet18.tv_in1k for ImageNet)")
    train.add_argument("--teacher-arch", help="timm architecture of a --teacher checkpoint that does not name it")
    train.add_argument("--teacher-classes", metavar="FILE", help="the teacher's class ids in output order")
    train.add_argument("--epochs", type=int, help="training epochs (default: 50 for MNIST, 300 else)")
    train.add_argument("--batch-size", type=int, help="training batch size (default: 100)")
    train.add_argument("--optimizer", choices=tuple(OPTIMIZER_DEFAULTS), default="adamw",
                       help="adamw (lr 1e-3, wd 0.01) or sgd with momentum 0.9 (lr 0.01, wd 5e-4) (default: adamw)")
    train.add_argument("--lr", type=float, help="base learning rate (default: by optimizer)")
    train.add_argument("--weight-decay", type=float, help="weight decay (default: by optimizer)")
    train.add_argument("--temperature", type=float, help="rded: distillation temperature T (default: 20)")
    train.add_argument("--crop-min", type=float, default=0.5,
                       help="random-resized crop: smallest area fraction (default: 0.5)")
    train.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="random horizontal flip (default: on, off for MNIST digits)")
    train.add_argument("--cutmix", action=argparse.BooleanOptionalAction, default=None,
                       help="CutMix (default: on for rded protocols, off for hard)")
    train.add_argument("--repeat", type=int, default=1,
                       help="students to train, repeat r seeded by (--seed, r); reported as mean ± std "
                            "(default: 1)")
    train.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    train.add_argument("--eval-every", type=int, help="test every N epochs and after the last "
                       "(default: 50 for MNIST, 10 else)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help="folder for eval.json (default: DIR/eval/ for a cao2 output)")
    out.add_argument("--plot", action="store_true", help="also write eval.png: test accuracy against epoch")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _check_numbers(args) -> None:
    checks = [
        (args.random_real is None or args.random_real >= 1, "--random-real must be at least 1"),
        (args.epochs is None or args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size is None or args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.lr is None or (math.isfinite(args.lr) and args.lr > 0), "--lr must be a positive number"),
        (args.weight_decay is None or (math.isfinite(args.weight_decay) and args.weight_decay >= 0),
         "--weight-decay must be 0 or more"),
        (args.temperature is None or (math.isfinite(args.temperature) and args.temperature > 0),
         "--temperature must be a positive number"),
        (0 < args.crop_min <= 1, "--crop-min must be in (0, 1]"),
        (args.repeat >= 1, "--repeat must be at least 1"),
        (args.eval_every is None or args.eval_every >= 1, "--eval-every must be at least 1"),
        (args.image_size is None or args.image_size >= 8, "--image-size must be at least 8"),
        (args.workers >= 0, "--workers must be 0 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    modes = [m for m, on in (("--data", args.data), ("--random-real", args.random_real is not None),
                             ("--full-real", args.full_real)) if on]
    if len(modes) != 1:
        raise UserError("give exactly one of --data DIR, --random-real IPC, --full-real"
                        + (f" (got {' and '.join(modes)})" if modes else ""))
    if args.train and args.data:
        raise UserError("--train is for the --random-real / --full-real baselines; --data already gives the "
                        "training images")
    if args.classes and args.data:
        raise UserError("--classes is for the --random-real / --full-real baselines; a --data set brings its own "
                        "classes")
    if args.protocol == "hard" and (args.teacher or args.teacher_arch or args.teacher_classes or args.temperature):
        raise UserError("--teacher/--temperature are for --protocol rded or rded-faithful; drop them or pick one")


def parse_as(parse, argv: list[str]) -> argparse.Namespace:
    """``parse(argv)`` (the top-level parser) for an eval command line that another command runs; the report
    records that command line as its own."""
    args = parse(argv)
    args.command_line = " ".join(["cao2", *argv])
    return args


def preflight(args, space=None, full=None) -> None:
    """Check an evaluation that will run later, once its set exists (``cao2 ablate``, ``cao2 sweep``, ``cao2
    compare``), so that a bad option fails before any distillation or training: the numbers, the folders, the
    device, the student and the teacher. ``space`` (and its whole dataset ``full``), when the caller knows them:
    the student is then built for that label space, the teacher must cover it and ``--val`` must hold it."""
    _check_numbers(args)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    import timm
    from ..data.classifiers import load_classifier
    from ..distill.engine import resolve_device
    from . import data as D
    from .protocols import PROTOCOLS
    from .students import create_student

    device = resolve_device(args.device)
    for flag, folder in (("--val", args.val), ("--train", args.train)):
        if folder and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder} is not a folder; give an existing folder of class subfolders")
    class_map = D.read_class_map(args.class_map)
    if space is not None:
        channels, size, _, _ = D.world(space, args.image_size)
        create_student(args.student or (MNIST_DEFAULTS if D.is_mnist(space) else IMAGENET_DEFAULTS)["student"],
                       len(space.ids), channels, size)
        if args.val and full is not None:
            D.real_folder(args.val, full, space, "validation", class_map)
    elif args.student and not timm.list_models(args.student.split(".")[0]):
        create_student(args.student, 1, 1, 32)      # an unknown name: raises the student's own one-line error
    if not PROTOCOLS[args.protocol].soft:
        return
    if args.teacher_classes and not Path(args.teacher_classes).is_file():
        raise UserError(f"--teacher-classes {args.teacher_classes} not found; give a file of class ids, one a line")
    if space is not None:
        load_classifier(args.teacher, space, device, args.teacher_arch, args.teacher_classes).output_indices(space)
    elif args.teacher:
        path = Path(args.teacher)
        if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.exists():
            if not path.is_file():
                raise UserError(f"--teacher {path} not found; give an existing checkpoint or a timm model name")
        elif not timm.list_models(args.teacher.split(".")[0]):
            raise UserError(f"--teacher {args.teacher!r} is neither a file nor a timm model name; give a timm name "
                            "(e.g. resnet18.tv_in1k) or a checkpoint path")


def _ver(pkg: str):
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def main(args: argparse.Namespace) -> int:
    """Run ``cao2 eval`` with parsed ``args``; returns 0, raises UserError for bad input."""
    _check_numbers(args)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    import torch
    from ..distill.engine import resolve_device
    from ..data.labels import label_space
    from . import data as D
    from .augment import AugmentSpec
    from .protocols import PROTOCOLS, Settings, Teacher, stderr_log, train_one
    from .report import build_report, markdown, write_outputs

    device = resolve_device(args.device)
    class_map = D.read_class_map(args.class_map)

    # --- what to train on, and the label space ---
    distilled = None
    if args.data:
        distilled = D.open_distilled(args.data, args.dataset, class_map)
        space, full = distilled.space, distilled.full_space
    else:
        if args.dataset:
            full = label_space(args.dataset)
        elif args.train:
            full = D.infer_space(Path(args.train), "training")
        else:
            raise UserError("the real baselines need --dataset (mnist, nette, ...) or a --train folder")
        space = full.select(args.classes) if args.classes else full
    mnist = D.is_mnist(space)
    channels, size, mean, std = D.world(space, args.image_size)
    defaults = MNIST_DEFAULTS if mnist else IMAGENET_DEFAULTS

    # --- held-out real data ---
    if args.val:
        files = D.real_folder(args.val, full, space, "validation", class_map)
        val = D.folder_set(files, space, f"{args.val} ({sum(map(len, files.values()))} images)", channels, size,
                           crop_pct=1.0 if mnist else D.VAL_CROP_PCT)
    elif mnist:
        val = D.mnist_set(args.mnist_split, space)
    else:
        raise UserError(f"dataset {space.name} has no built-in test data; pass --val DIR (ImageNet val layout, "
                        "DIR/<wnid>/*.JPEG)")

    # --- training data ---
    if distilled is not None:
        train_set = D.folder_set(distilled.images, space, str(distilled.root), channels, size)
        per_class = train_set.per_class(len(space.ids))
        ipc = per_class[0] if len(set(per_class)) == 1 else None
        label = f"{distilled.root} (distilled, {'IPC ' + str(ipc) if ipc else f'{len(train_set)} images'})"
        data_info = {"kind": "distilled", "path": str(distilled.root), **distilled.info, "per_class": per_class,
                     "ipc": ipc}
        real_source = None
    else:
        if args.train:
            files = D.real_folder(args.train, full, space, "training", class_map)
            real_source = D.folder_set(files, space, str(args.train), channels, size)
            source_name = str(args.train)
        elif mnist:
            real_source = D.mnist_set("train", space)
            source_name = "MNIST train split"
        else:
            raise UserError(f"--{'random' if args.random_real else 'full'}-real on dataset {space.name} needs "
                            "--train DIR (real training images, DIR/<wnid>/*.JPEG)")
        if args.random_real:
            # check every class has enough images before any training
            D.random_real_indices(real_source.labels, len(space.ids), args.random_real, args.seed, 0, source_name)
            label = f"random real IPC {args.random_real} ({source_name})"
            data_info = {"kind": "random-real", "ipc": args.random_real, "source": source_name}
        else:
            label = f"full real ({source_name}, {len(real_source)} images)"
            data_info = {"kind": "full-real", "source": source_name,
                         "per_class": real_source.per_class(len(space.ids))}
        train_set = None
    data_info.update({"label": label, "dataset": space.name, "classes": list(space.ids),
                      "val": val.description, "val_images": len(val)})

    # --- protocol, teacher, settings ---
    protocol = PROTOCOLS[args.protocol]
    teacher = None
    if protocol.soft:
        from ..data.classifiers import load_classifier
        clf = load_classifier(args.teacher, space, device, args.teacher_arch, args.teacher_classes)
        teacher = Teacher(clf, space, device)
    opt_lr, opt_wd = OPTIMIZER_DEFAULTS[args.optimizer]
    epochs = args.epochs or defaults["epochs"]
    settings = Settings(
        protocol=args.protocol, student=args.student or defaults["student"], epochs=epochs,
        batch_size=args.batch_size or defaults["batch_size"], lr=args.lr or opt_lr,
        weight_decay=opt_wd if args.weight_decay is None else args.weight_decay, optimizer=args.optimizer,
        temperature=(args.temperature or protocol.temperature) if protocol.soft else None,
        augment=AugmentSpec(crop_min=args.crop_min, flip=(not mnist) if args.flip is None else args.flip,
                            cutmix=protocol.cutmix if args.cutmix is None else args.cutmix,
                            patch_shuffle=protocol.patch_shuffle),
        eval_every=min(args.eval_every or defaults["eval_every"], epochs), repeats=args.repeat, seed=args.seed,
        channels=channels, image_size=size, mean=tuple(mean), std=tuple(std), workers=args.workers)
    from .students import create_student
    create_student(settings.student, len(space.ids), channels, size)      # refuse a bad --student before training

    # --- where the report goes (checked now, written at the end) ---
    if args.out:
        out = Path(args.out)
    elif distilled is not None and distilled.is_run:
        out = distilled.root / "eval"
    else:
        raise UserError("pass --out DIR for the report (only a cao2 run output has a default, DIR/eval/)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")

    # --- train ---
    log = None if args.quiet else stderr_log
    if train_set is not None:
        train_set.cache(args.workers)
    if real_source is not None and args.full_real:
        real_source.cache(args.workers)
    val.cache(args.workers)
    results = []
    for r in range(args.repeat):
        repeat_train, repeat_data = train_set, {}
        if args.random_real:
            idx = D.random_real_indices(real_source.labels, len(space.ids), args.random_real, args.seed, r)
            repeat_train = real_source.subset(idx, label).cache(args.workers)
            repeat_data = {"subset": [str(p) for p in repeat_train.files] if repeat_train.files is not None
                           else [int(i) for i in idx], "subset_of": data_info["source"]}
        elif args.full_real:
            repeat_train = real_source
        result = train_one(repeat_train, val, space, settings, r, device, teacher, log)
        result.data = repeat_data
        results.append(result)

    config = {
        "command": getattr(args, "command_line", None)      # set by the commands that run evaluations in turn
        or (" ".join(["cao2", "eval", *sys.argv[2:]]) if len(sys.argv) > 1 and sys.argv[1] == "eval"
            else " ".join(sys.argv)),
        "settings": settings.as_dict(),
        "protocol": {k: v for k, v in vars(protocol).items()},
        "teacher": None if teacher is None else {"source": teacher.source, "sha256": teacher.sha256},
        "device": str(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{p: _ver(p) for p in ("cao2", "timm", "torchvision")}},
        "seeds": "repeat r uses sha256('cao2/{seed}/{r}/0/eval/{init|order|augment}')[:8]; random-real class c of "
                 "repeat r uses sha256('cao2/{seed}/{c}/{r}/eval/random-real')[:8]",
    }
    report = build_report(config, data_info, results)
    written = write_outputs(out, report, args.plot)
    print(markdown(report))
    print()
    for path in written:
        print(f"wrote {path}")
    return 0
