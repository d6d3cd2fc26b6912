"""``evaluate``: train students on a distilled set (or a real baseline) and test them on real held-out data.

``evaluate(EvalConfig(...))`` checks every option, trains ``repeat`` students, writes ``eval.json`` (and
``eval.png`` with ``plot``) and returns an ``EvalResult``; ``check`` is the part that an evaluation to run later
(``cao2 ablate``, ``cao2 sweep``, ``cao2 compare``) calls first, so a bad option fails before any distillation or
training. Bad input raises ``cao2core.errors.UserError``; nothing is written unless the whole evaluation succeeded.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import OPTIMIZERS, EvalConfig
from ..errors import UserError

MNIST_DEFAULTS = {"student": "convnet3", "epochs": 50, "batch_size": 100, "eval_every": 50}
IMAGENET_DEFAULTS = {"student": "resnet18", "epochs": 300, "batch_size": 100, "eval_every": 10}


@dataclass
class EvalResult:
    """What ``evaluate`` measured and wrote. ``accuracy``: the protocol's figure (final-epoch test accuracy, %,
    mean over the students; RDED's for rded-faithful), ``std`` its spread; ``report``: the whole eval.json."""

    report: dict
    out: Path                                       # the folder of eval.json
    files: list[Path] = field(default_factory=list)  # what was written

    @property
    def accuracy(self) -> float:
        return self.report["summary"]["headline"]["mean"]

    @property
    def std(self) -> float:
        return self.report["summary"]["headline"]["std"]

    @property
    def accuracies(self) -> list[float]:
        """The figure of each student."""
        return list(self.report["summary"]["headline"]["values"])

    def table(self) -> str:
        """The markdown table ``cao2 eval`` prints."""
        from .report import markdown
        return markdown(self.report)


def check(config: EvalConfig, space=None, full=None) -> None:
    """Check an evaluation that will run later, once its set exists (``cao2 ablate``, ``cao2 sweep``, ``cao2
    compare``), so that a bad option fails before any distillation or training: the numbers, the folders, the
    device, the student and the teacher. ``space`` (and its whole dataset ``full``), when the caller knows them:
    the student is then built for that label space, the teacher must cover it and ``--val`` must hold it."""
    config.validate()
    if config.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    import timm
    from ..data.classifiers import load_classifier
    from ..environment import resolve_device
    from . import data as eval_data
    from .protocols import PROTOCOLS
    from .students import create_student

    device = resolve_device(config.device)
    for flag, folder in (("--val", config.val), ("--train", config.train)):
        if folder and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder} is not a folder; give an existing folder of class subfolders")
    class_map = eval_data.read_class_map(config.class_map)
    if space is not None:
        channels, size, _, _ = eval_data.world(space, config.image_size)
        create_student(config.student or (MNIST_DEFAULTS if eval_data.is_mnist(space) else IMAGENET_DEFAULTS)["student"],
                       len(space.ids), channels, size)
        if config.val and full is not None:
            eval_data.real_folder(config.val, full, space, "validation", class_map)
    elif config.student and not timm.list_models(config.student.split(".")[0]):
        create_student(config.student, 1, 1, 32)      # an unknown name: raises the student's own one-line error
    if not PROTOCOLS[config.protocol].soft:
        return
    if config.teacher_classes and not Path(config.teacher_classes).is_file():
        raise UserError(f"--teacher-classes {config.teacher_classes} not found; give a file of class ids, one a line")
    if space is not None:
        load_classifier(config.teacher, space, device, config.teacher_arch, config.teacher_classes,
                        flag="--teacher").output_indices(space)
    elif config.teacher:
        path = Path(config.teacher)
        if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.exists():
            if not path.is_file():
                raise UserError(f"--teacher {path} not found; give an existing checkpoint or a timm model name")
        elif not timm.list_models(config.teacher.split(".")[0]):
            raise UserError(f"--teacher {config.teacher!r} is neither a file nor a timm model name; give a timm name "
                            "(e.g. resnet18.tv_in1k) or a checkpoint path")


def evaluate(config: EvalConfig, log: Callable[[str], None] | None = None, command: str | None = None
             ) -> EvalResult:
    """Train ``config.repeat`` students and test them; writes eval.json into ``config.out`` (default: the run's
    eval/ folder) and returns what was measured. ``log`` receives the progress lines (default: stderr unless
    ``config.quiet``); ``command``: the command line the report records (default: the equivalent ``cao2 eval``)."""
    config.validate()
    if config.plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    from ..environment import resolve_device, versions
    from ..data.labels import label_space
    from . import data as eval_data
    from .augment import AugmentSpec
    from .protocols import PROTOCOLS, Settings, Teacher, stderr_log, train_one
    from .report import build_report, write_outputs
    from ..outputs import check_apart, check_writable

    device = resolve_device(config.device)
    class_map = eval_data.read_class_map(config.class_map)

    # --- what to train on, and the label space ---
    distilled = None
    if config.data:
        distilled = eval_data.open_distilled(config.data, config.dataset, class_map)
        space, full = distilled.space, distilled.full_space
    else:
        if config.dataset:
            full = label_space(config.dataset)
        elif config.train:
            full = eval_data.infer_space(Path(config.train), "training")
        else:
            raise UserError("the real baselines need --dataset (mnist, nette, ...) or a --train folder")
        space = full.select(config.classes) if config.classes else full
    mnist = eval_data.is_mnist(space)
    channels, size, mean, std = eval_data.world(space, config.image_size)
    defaults = MNIST_DEFAULTS if mnist else IMAGENET_DEFAULTS

    # --- held-out real data ---
    if config.val:
        files = eval_data.real_folder(config.val, full, space, "validation", class_map)
        val = eval_data.folder_set(files, space, f"{config.val} ({sum(map(len, files.values()))} images)", channels, size,
                           crop_pct=1.0 if mnist else eval_data.VAL_CROP_PCT)
    elif mnist:
        val = eval_data.mnist_set(config.mnist_split, space)
    else:
        raise UserError(f"dataset {space.name} has no built-in test data; pass --val DIR (ImageNet val layout, "
                        "DIR/<wnid>/*.JPEG)")

    # --- training data ---
    if distilled is not None:
        train_set = eval_data.folder_set(distilled.images, space, str(distilled.root), channels, size)
        per_class = train_set.per_class(len(space.ids))
        ipc = per_class[0] if len(set(per_class)) == 1 else None
        label = f"{distilled.root} (distilled, {'IPC ' + str(ipc) if ipc else f'{len(train_set)} images'})"
        data_info = {"kind": "distilled", "path": str(distilled.root), **distilled.info, "per_class": per_class,
                     "ipc": ipc}
        real_source = None
    else:
        if config.train:
            files = eval_data.real_folder(config.train, full, space, "training", class_map)
            real_source = eval_data.folder_set(files, space, str(config.train), channels, size)
            source_name = str(config.train)
        elif mnist:
            real_source = eval_data.mnist_set("train", space)
            source_name = "MNIST train split"
        else:
            raise UserError(f"--{'random' if config.random_real else 'full'}-real on dataset {space.name} needs "
                            "--train DIR (real training images, DIR/<wnid>/*.JPEG)")
        if config.random_real:
            # check every class has enough images before any training
            eval_data.random_real_indices(real_source.labels, len(space.ids), config.random_real, config.seed, 0, source_name)
            label = f"random real IPC {config.random_real} ({source_name})"
            data_info = {"kind": "random-real", "ipc": config.random_real, "source": source_name}
        else:
            label = f"full real ({source_name}, {len(real_source)} images)"
            data_info = {"kind": "full-real", "source": source_name,
                         "per_class": real_source.per_class(len(space.ids))}
        train_set = None
    data_info.update({"label": label, "dataset": space.name, "classes": list(space.ids),
                      "val": val.description, "val_images": len(val)})

    # --- protocol, teacher, settings ---
    protocol = PROTOCOLS[config.protocol]
    teacher = None
    if protocol.soft:
        from ..data.classifiers import load_classifier
        clf = load_classifier(config.teacher, space, device, config.teacher_arch, config.teacher_classes,
                              flag="--teacher")
        teacher = Teacher(clf, space, device)
    opt_lr, opt_wd = OPTIMIZERS[config.optimizer]
    epochs = config.epochs or defaults["epochs"]
    settings = Settings(
        protocol=config.protocol, student=config.student or defaults["student"], epochs=epochs,
        batch_size=config.batch_size or defaults["batch_size"], lr=config.lr or opt_lr,
        weight_decay=opt_wd if config.weight_decay is None else config.weight_decay, optimizer=config.optimizer,
        temperature=(config.temperature or protocol.temperature) if protocol.soft else None,
        augment=AugmentSpec(crop_min=config.crop_min, flip=(not mnist) if config.flip is None else config.flip,
                            cutmix=protocol.cutmix if config.cutmix is None else config.cutmix,
                            patch_shuffle=protocol.patch_shuffle),
        eval_every=min(config.eval_every or defaults["eval_every"], epochs), repeats=config.repeat, seed=config.seed,
        channels=channels, image_size=size, mean=tuple(mean), std=tuple(std), workers=config.workers)
    from .students import create_student
    create_student(settings.student, len(space.ids), channels, size)      # refuse a bad --student before training

    # --- where the report goes (checked now, written at the end) ---
    if config.out:
        out = Path(config.out)
    elif distilled is not None and distilled.is_run:
        out = distilled.root / "eval"
    else:
        raise UserError("pass --out DIR for the report (only a cao2 run output has a default, DIR/eval/)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    if distilled is not None:
        check_apart(config.data, "--data", out, "--out", distilled.root / "eval" if distilled.is_run else None)
    for flag, folder in (("--train", config.train), ("--val", config.val)):
        if folder:      # a report inside the validation images would be read as test data by the next eval
            check_apart(folder, flag, out, "--out")
    check_writable(out, "--out")

    # --- train ---
    if log is None and not config.quiet:
        log = stderr_log
    if train_set is not None:
        train_set.cache(config.workers)
    if real_source is not None and config.full_real:
        real_source.cache(config.workers)
    val.cache(config.workers)
    results = []
    for r in range(config.repeat):
        repeat_train, repeat_data = train_set, {}
        if config.random_real:
            idx = eval_data.random_real_indices(real_source.labels, len(space.ids), config.random_real, config.seed, r)
            repeat_train = real_source.subset(idx, label).cache(config.workers)
            repeat_data = {"subset": [str(p) for p in repeat_train.files] if repeat_train.files is not None
                           else [int(i) for i in idx], "subset_of": data_info["source"]}
        elif config.full_real:
            repeat_train = real_source
        result = train_one(repeat_train, val, space, settings, r, device, teacher, log)
        result.data = repeat_data
        results.append(result)

    record = {
        "command": command or " ".join(["cao2", *config.to_argv()]),
        "settings": settings.as_dict(),
        "protocol": {k: v for k, v in vars(protocol).items()},
        "teacher": None if teacher is None else {"source": teacher.source, "sha256": teacher.sha256},
        "device": str(device),
        "versions": versions("cao2", "timm", "torchvision"),
        "seeds": "repeat r uses sha256('cao2/{seed}/{r}/0/eval/{init|order|augment}')[:8]; random-real class c of "
                 "repeat r uses sha256('cao2/{seed}/{c}/{r}/eval/random-real')[:8]",
    }
    report = build_report(record, data_info, results)
    return EvalResult(report, out, write_outputs(out, report, config.plot))

