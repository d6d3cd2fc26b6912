"""The typed configurations of the API: ``RunConfig`` (``cao2 run`` and ``cao2 refine``) and ``EvalConfig``
(``cao2 eval``). Each is one table of options: the CLI builds its flags from the fields (name, type, help,
choices), ``--config`` TOML files use the same names, and a notebook passes them as keyword arguments.

This module imports no torch, so ``cao2 --help`` stays fast.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import UserError
from .outputs import check_apart, check_name
from .generators.hookspecs import CLASSIFIER_INPUTS, CONDITION_KINDS, GENERIC_OPTIONS

CONDITIONS = CONDITION_KINDS + ("auto",)
PROFILES = ("default", "reference")
STRATEGIES = ("confidence", "stability", "random", "none")     # OSS: cao2core.method.oss
JUDGED_STRATEGIES = ("confidence", "stability")     # those that decode and classify the pool (a judge is loaded)
ORDERS = ("easy", "hard")
KERNEL_BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")   # cao2core.kernels
PROTOCOLS = ("hard", "rded", "rded-faithful")                   # cao2core.scoring.protocols
OPTIMIZERS = {"adamw": (1e-3, 0.01), "sgd": (0.01, 5e-4)}       # (lr, weight decay) of cao2 eval's optimizers


def option(default, help_text: str, choices=None, affects_output: bool = True, commands=("run", "refine"),
           **extra):
    """One field of a configuration table: its default, the help its flag shows, the values it takes, whether it
    changes what a run writes (``affects_output``: part of the run's identity) and which commands have it."""
    meta = dict(help=help_text, choices=choices, affects_output=affects_output, commands=commands, **extra)
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)




@dataclass
class RunConfig:
    """Everything ``cao2 run`` (and ``cao2 refine``, with ``images``) takes; ``distill(RunConfig(...))`` runs it.
    Every field is a flag of the same name (``clo_lr`` is ``--clo-lr``) and a ``--config`` TOML key."""

    generator: str = option("dit", "generator plugin (see `cao2 plugins`)")
    model: str | None = option(None, "generator checkpoint: a diffusers folder, an original checkpoint file or a hub "
                                   "id; default: the generator's embedded MNIST world")
    vae: str | None = option(None, "VAE folder or hub id; default: the one beside --model, else the generator's default")
    classifier: str | None = option(None, "selection classifier: a timm model name or a local checkpoint; default: "
                                        "the embedded MNIST judge, resnet18.tv_in1k for ImageNet")
    classifier_arch: str | None = option(None, "timm architecture of a --classifier checkpoint that does not name it")
    classifier_classes: str | None = option(None, "file of the classifier's class ids in output order (one per line)")
    classifier_input: str | None = option(None, "what the selection classifier sees: timm = clamp to [0, 1] and the "
                                              "classifier's own preprocessing; raw = the decoder output resized "
                                              "to the classifier's input size, nothing else (the official DiT "
                                              "scripts); jpeg = a JPEG round trip, resize 224 and ImageNet "
                                              "normalization (the official MAR script); default: timm, or the "
                                              "generator's official input under --profile reference",
                                        CLASSIFIER_INPUTS)
    dataset: str | None = option(None, "label space: mnist, nette, woof, in100, in1k, a generator's own "
                                     "(cifar10, ...) or a file of ID [NAME] lines; default: the generator's own")
    classes: str | None = option(None, "subset of classes: comma-separated ids or positions, A-B ranges; default: all")
    images: str | None = option(None, "folder of existing images to refine, one subfolder per class (class id or "
                                    "class name)", commands=("refine",))
    ipc: int | str = option(10, "images per class to distill (refine: or 'all' = every given image)", parse="ipc")
    pool_factor: int = option(4, "pool size per class = pool-factor x IPC (m in the paper)", commands=("run",))
    select: str = option("confidence", "selection strategy", STRATEGIES)
    order: str = option("easy", "confidence order: easy = most confident first, hard = least first", ORDERS)
    clo_iters: int = option(100, "CLO iterations (0 = selection only)")
    clo_lr: float = option(6e-4, "CLO Adam learning rate")
    clo_lambda: float = option(10.0, "weight of the L-infinity term of the CLO loss")
    clo_tmax: int | None = option(None, "largest CLO corruption level T-hat; default: the generator's (DiT: 224, "
                                      "or 11 with --timestep-convention reference; MAR: 999, the bound of the "
                                      "head's per-token timestep)")
    condition: str = option("null", "CLO condition per class: class label, null (CFG) label, zero label embedding, "
                                  "or auto = class label for easy classes, null for hard ones", CONDITIONS)
    condition_threshold: float = option(0.7, "auto: classes whose classifier validation accuracy is at least this "
                                           "use the class label")
    class_accuracy: str | None = option(None, "auto: JSON file {class id: validation accuracy}; default: the "
                                            "classifier checkpoint's own record")
    timestep_convention: str | None = option(None, "DiT CLO timesteps: default = model told the noise level's own "
                                                 "t; reference = as the official code (respaced noise, raw index); "
                                                 "default: the --profile's", ("default", "reference"))
    sampler: str | None = option(None, "generator sampler (DiT: ddpm or ddim; SD: a diffusers scheduler name such as "
                                     "ddim, dpm, euler; MAR has one); default: the generator's")
    sample_steps: int | None = option(None, "sampling steps; default: the generator's (DiT: 50; MAR: 32 AR steps; "
                                          "SD: 50)")
    guidance: float | None = option(None, "classifier-free guidance scale; default: the generator's (DiT-XL/2: 2.7, "
                                        "MAR: 2.9, SD: 7.5)")
    gen_opt: list = option(list, "generator-specific option KEY=VALUE (repeatable)", nargs="append_kv")
    profile: str = option("default", "default = the corrected method; reference = everything the official CaO2 code "
                                   "does that the default corrects (timestep convention, guidance channels, "
                                   "classifier input; see docs/fidelity.md), for reproducing a paper number",
                        PROFILES)
    kernels: str = option("auto", "CLO loss/Adam kernels: auto = triton or cuda on GPUs, cpp on CPUs, else torch; "
                                "the CAO2_KERNELS environment variable overrides auto", KERNEL_BACKENDS,
                        affects_output=False)
    batch_size: int | str = option(64, "samples per forward pass (sampling, scoring, CLO, decoding); classes whose "
                                     "kept latents fit one chunk share it; auto = the largest that fits the GPU's "
                                     "free memory (CPU: 64; a resumed run reuses the recorded size)",
                                 affects_output=False, parse="batch_size")
    seed: int = option(0, "run seed; every draw comes from a generator seeded by (seed, class, index)")
    device: str = option("auto", "torch device: auto, cpu, cuda, cuda:N", affects_output=False)
    dtype: str = option("fp32", "generator weights dtype", ("fp32", "bf16", "fp16"))
    out: str = option("out/cao2", "output folder", affects_output=False)
    dry_run: int | None = option(None, "print the work, FLOPs and projected time for RANKS ranks (default 1), "
                                     "measured on one chunk; write nothing", affects_output=False,
                               commands=("run",), parse="dry_run")
    overwrite: bool = option(False, "replace an output folder that holds a run of another configuration",
                           affects_output=False)
    progress: bool = option(True, "show progress bars", affects_output=False)
    from_preset: dict = option(dict, "the fields a --preset set, and its name (for messages; not a flag)",
                               affects_output=False, commands=())

    def validate(self) -> None:
        if self.ipc == "all" and not self.images:
            raise UserError("--ipc all keeps every given image: it is for `cao2 refine --images DIR`; give a number")
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)    # noqa: E731
        checks = [(self.ipc == "all" or self.ipc >= 1, f"--ipc must be at least 1, got {self.ipc}"),
                  (self.pool_factor >= 1, f"--pool-factor must be at least 1, got {self.pool_factor}"),
                  (self.clo_iters >= 0, f"--clo-iters must be 0 or more, got {self.clo_iters}"),
                  (finite(self.clo_lr) and self.clo_lr > 0, f"--clo-lr must be a positive number, got {self.clo_lr}"),
                  (finite(self.clo_lambda) and self.clo_lambda >= 0,
                   f"--clo-lambda must be 0 or more, got {self.clo_lambda}"),
                  (self.guidance is None or (finite(self.guidance) and self.guidance >= 0),
                   f"--guidance must be a finite number, 0 or more, got {self.guidance}"),
                  (finite(self.condition_threshold) and 0 <= self.condition_threshold <= 1,
                   f"--condition-threshold must be an accuracy in [0, 1], got {self.condition_threshold}"),
                  (self.clo_tmax is None or self.clo_tmax >= 1, f"--clo-tmax must be at least 1, got {self.clo_tmax}"),
                  (self.classes is None or self.classes.strip(" ,") != "",
                   "--classes is empty (an unset shell variable?); give class ids or positions, or leave the flag "
                   "out to distill every class"),
                  (self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
                   f"--batch-size must be at least 1 or auto, got {self.batch_size}"),
                  (self.dry_run is None or self.dry_run >= 1, "--dry-run RANKS must be at least 1"),
                  (self.sample_steps is None or self.sample_steps >= 1, "--sample-steps must be at least 1"),
                  (not (self.images and self.select == "stability"),
                   "--select stability compares sampler steps, which given images do not have; use confidence, "
                   "random or none")]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        check_name(self.out, "--out")
        if self.images:
            check_apart(self.images, "--images", self.out, "--out")

    def origin(self, name: str) -> str:
        """" (the value of --preset NAME)" when the field ``name`` holds a preset's value, else ""."""
        return f" (the value of --preset {self.from_preset[name]})" if name in self.from_preset else ""

    def output_key(self) -> dict:
        """The options that change what is written: a rerun with the same key may resume the output."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["affects_output"]}

    def gen_options(self) -> dict:
        opts = {k: getattr(self, k) for k in GENERIC_OPTIONS}
        for item in self.gen_opt:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--gen-opt {item!r} is not KEY=VALUE")
            key = key.replace("-", "_")
            if key in GENERIC_OPTIONS:      # it would silently replace the flag's value
                raise UserError(f"--gen-opt {key}: {key} is one of cao2's own options; give it as "
                                f"--{key.replace('_', '-')} instead")
            opts[key] = value
        return opts


EVAL = ("eval",)


def eval_option(default, help_text: str, group: str, **extra):
    """A field of ``EvalConfig``: ``group`` is the section of ``cao2 eval --help`` it is listed under."""
    return option(default, help_text, affects_output=False, commands=EVAL, group=group, **extra)


WHAT, DATA, TRAINING, OUTPUT = "what to evaluate (one of)", "data", "training", "output"


@dataclass
class EvalConfig:
    """Everything ``cao2 eval`` takes; ``evaluate(EvalConfig(data=...))`` trains the students and returns their
    test accuracy. Give exactly one of ``data``, ``random_real`` and ``full_real``. Every field is a flag of the
    same name (``random_real`` is ``--random-real``); ``None`` means the default for the label space (MNIST or
    ImageNet), which the help text names."""

    data: str | None = eval_option(None, "distilled set: a `cao2 run` output (manifest.json + images/) or an "
                                         "ImageFolder (DIR/<class id>/*.png)", WHAT, metavar="DIR")
    random_real: int | None = eval_option(None, "baseline: IPC random real images per class from --train (MNIST: the "
                                                "built-in train split); a new seeded subset per repeat", WHAT,
                                          metavar="IPC")
    full_real: bool = eval_option(False, "baseline: the whole real training set (the ceiling)", WHAT)
    dataset: str | None = eval_option(None, "label space: mnist, nette, woof, in100, in1k or a file of wnids; default: "
                                            "the run's (cao2 output) or the one whose class ids are the folder names",
                                      DATA)
    classes: str | None = eval_option(None, "--random-real / --full-real: only these classes of --dataset (ids or "
                                            "positions, A-B ranges, as `cao2 run --classes`), to match a run "
                                            "distilled with --classes; default: all", DATA)
    train: str | None = eval_option(None, "real training images for --random-real / --full-real (default for MNIST: "
                                          "the built-in 50k train split)", DATA, metavar="DIR")
    val: str | None = eval_option(None, "real held-out images, DIR/<wnid>/*.JPEG (ImageNet val layout); default for "
                                        "MNIST: the built-in 10k test split", DATA, metavar="DIR")
    mnist_split: str = eval_option("test", "MNIST: the built-in held-out split students are tested on: test (report "
                                           "figures) or val (the 10k validation split held out from train: choose "
                                           "settings on it) (default: test)", DATA, choices=("test", "val"))
    class_map: str | None = eval_option(None, "rename class folders: one 'FOLDER CLASS_ID' per line (e.g. RDED's "
                                              "00000..00009 folders)", DATA, metavar="FILE")
    image_size: int | None = eval_option(None, "student input size for ImageNet label spaces (default: 224); MNIST is "
                                               "32", DATA)
    workers: int = eval_option(0, "data-loading processes for on-disk folders (default: 0)", DATA)
    protocol: str = eval_option("hard", "hard: CE on labels; rded: teacher soft labels (KL, T^2), full cosine, final "
                                        "epoch; rded-faithful: RDED/CaO2's quirks (default: hard)", TRAINING,
                                choices=PROTOCOLS)
    student: str | None = eval_option(None, "timm architecture or convnet3 (default: convnet3 for MNIST, resnet18 "
                                            "else)", TRAINING)
    teacher: str | None = eval_option(None, "rded: a timm model name or a local checkpoint (default: the embedded "
                                            "MNIST judge, resnet18.tv_in1k for ImageNet)", TRAINING)
    teacher_arch: str | None = eval_option(None, "timm architecture of a --teacher checkpoint that does not name it",
                                           TRAINING)
    teacher_classes: str | None = eval_option(None, "the teacher's class ids in output order", TRAINING,
                                              metavar="FILE")
    epochs: int | None = eval_option(None, "training epochs (default: 50 for MNIST, 300 else)", TRAINING)
    batch_size: int | None = eval_option(None, "training batch size (default: 100)", TRAINING)
    optimizer: str = eval_option("adamw", "adamw (lr 1e-3, wd 0.01) or sgd with momentum 0.9 (lr 0.01, wd 5e-4) "
                                          "(default: adamw)", TRAINING, choices=tuple(OPTIMIZERS))
    lr: float | None = eval_option(None, "base learning rate (default: by optimizer)", TRAINING)
    weight_decay: float | None = eval_option(None, "weight decay (default: by optimizer)", TRAINING)
    temperature: float | None = eval_option(None, "rded: distillation temperature T (default: 20)", TRAINING)
    crop_min: float = eval_option(0.5, "random-resized crop: smallest area fraction (default: 0.5)", TRAINING)
    flip: bool | None = eval_option(None, "random horizontal flip (default: on, off for MNIST digits)", TRAINING)
    cutmix: bool | None = eval_option(None, "CutMix (default: on for rded protocols, off for hard)", TRAINING)
    repeat: int = eval_option(1, "students to train, repeat r seeded by (--seed, r); reported as mean ± std "
                                 "(default: 1)", TRAINING)
    seed: int = eval_option(0, "base seed (default: 0)", TRAINING)
    eval_every: int | None = eval_option(None, "test every N epochs and after the last (default: 50 for MNIST, 10 "
                                               "else)", TRAINING)
    device: str = eval_option("auto", "auto, cpu, cuda, cuda:N (default: auto)", TRAINING)
    out: str | None = eval_option(None, "folder for eval.json (default: DIR/eval/ for a cao2 output)", OUTPUT,
                                  metavar="DIR")
    plot: bool = eval_option(False, "also write eval.png: test accuracy against epoch", OUTPUT)
    quiet: bool = eval_option(False, "no progress lines on stderr", OUTPUT)

    def validate(self) -> None:
        """Refuse bad numbers and contradictory options (one line each), before anything is loaded."""
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)    # noqa: E731
        checks = [
            (self.random_real is None or self.random_real >= 1, "--random-real must be at least 1"),
            (self.epochs is None or self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr is None or (finite(self.lr) and self.lr > 0), "--lr must be a positive number"),
            (self.weight_decay is None or (finite(self.weight_decay) and self.weight_decay >= 0),
             "--weight-decay must be 0 or more"),
            (self.temperature is None or (finite(self.temperature) and self.temperature > 0),
             "--temperature must be a positive number"),
            (0 < self.crop_min <= 1, "--crop-min must be in (0, 1]"),
            (self.repeat >= 1, "--repeat must be at least 1"),
            (self.eval_every is None or self.eval_every >= 1, "--eval-every must be at least 1"),
            (self.image_size is None or self.image_size >= 8, "--image-size must be at least 8"),
            (self.workers >= 0, "--workers must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got "
                                f"{getattr(self, f.name)!r}")
        modes = [m for m, on in (("--data", self.data), ("--random-real", self.random_real is not None),
                                 ("--full-real", self.full_real)) if on]
        if len(modes) != 1:
            raise UserError("give exactly one of --data DIR, --random-real IPC, --full-real"
                            + (f" (got {' and '.join(modes)})" if modes else ""))
        if self.train and self.data:
            raise UserError("--train is for the --random-real / --full-real baselines; --data already gives the "
                            "training images")
        if self.classes and self.data:
            raise UserError("--classes is for the --random-real / --full-real baselines; a --data set brings its own "
                            "classes")
        if self.protocol == "hard" and (self.teacher or self.teacher_arch or self.teacher_classes or self.temperature):
            raise UserError("--teacher/--temperature are for --protocol rded or rded-faithful; drop them or pick one")

    def to_argv(self) -> list[str]:
        """The ``cao2 eval`` command line that runs this configuration: the options that differ from the
        defaults, in the order of the table (what a report records, so a reader can rerun it)."""
        argv = ["eval"]
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            if value == default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, str(value)]
        return argv


def replace(config, **changes):
    """``dataclasses.replace`` for the configurations: a copy with ``changes``."""
    return dataclasses.replace(config, **changes)


def resolve_run_config(preset: str | None = None, config_file: str | None = None, command: str = "run",
                       **options) -> RunConfig:
    """A ``RunConfig`` from a ``--preset`` NAME, a ``--config`` TOML file and options, in that order of
    precedence (later wins; ``gen_opt`` pairs merge by key, so adding one keeps the preset's others). The CLI
    passes the flags given on its command line as ``options``; ``command`` ("run" or "refine") is the command
    the config file is for (a key of the other command's is refused)."""
    from .method import presets
    chosen = presets.get(preset) if preset else None
    toml = load_toml(config_file, command) if config_file else {}
    profile = options.get("profile", toml.get("profile", chosen.options.get("profile") if chosen else None))
    later = {**toml, **options}
    values = chosen.options_for(profile, later.get("sample_steps"), later.get("timestep_convention")) if chosen else {}
    from_preset = {k: preset for k in values if k not in later}
    for layer in (toml, options):
        if "gen_opt" in layer and "gen_opt" in values:
            layer = {**layer, "gen_opt": merge_gen_opts(values["gen_opt"], layer["gen_opt"])}
        values.update(layer)
    if from_preset:
        values["from_preset"] = from_preset
    try:
        return RunConfig(**values)
    except TypeError as exc:
        raise UserError(f"bad configuration: {exc}") from None


def merge_gen_opts(earlier: list[str], later: list[str]) -> list[str]:
    """``--gen-opt KEY=VALUE`` lists merged by key (the later wins)."""
    merged = {item.partition("=")[0]: item for item in earlier}
    merged.update({item.partition("=")[0]: item for item in later})
    return list(merged.values())


def load_toml(path: str, command: str = "run") -> dict:
    """Read a --config file of ``cao2 command``; keys are the flag names (dashes or underscores; one spelling
    each), values of the flags' types."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name: f for f in fields(RunConfig)}
    out, spelled = {}, {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known or not known[name].metadata["commands"]:
            raise UserError(f"config file {path}: unknown key {key!r}; keys are the `cao2 {command}` flag names")
        if name in spelled:
            raise UserError(f"config file {path}: {spelled[name]!r} and {key!r} are the same option; keep one of them")
        commands = known[name].metadata["commands"]
        if command not in commands:
            raise UserError(f"config file {path}: {key!r} is an option of `cao2 {' / cao2 '.join(commands)}`, not "
                            f"of `cao2 {command}`; remove it from the file or use that command")
        spelled[name] = key
        out[name] = typed(known[name], value, f"config file {path}: {key}")
    return out


COUNT_WORDS = {"ipc": "all", "batch_size": "auto"}   # the word a count option takes besides a number


def base_type(f) -> str:
    """A RunConfig field's type without ``| None`` (and any other alternative): "int", "float", "bool", "str"."""
    return str(f.type).split("|")[0].strip()


def typed(f, value, where: str):
    """A --config value checked against its flag's type and choices (TOML's own types: no "false" for false)."""
    kind, words = base_type(f), COUNT_WORDS
    if value is None:
        raise UserError(f"{where}: no value")
    if f.name == "gen_opt":         # KEY=VALUE strings; a single string or a table are accepted too
        if isinstance(value, dict):
            value = [f"{k}={'true' if v is True else 'false' if v is False else v}" for k, v in value.items()]
        elif isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f'{where}: give KEY=VALUE strings, e.g. gen-opt = ["autocast=bf16"]')
        return value
    if f.name == "classes" and isinstance(value, list) and all(isinstance(v, (int, str)) for v in value):
        value = ",".join(str(v) for v in value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false (a TOML boolean, unquoted), got {value!r}")
        return value
    if value is True or value is False:
        raise UserError(f"{where} must not be a boolean, got {value!r}")
    if f.name in words and value == words[f.name]:
        return value
    if kind.startswith("int"):
        if not isinstance(value, int):
            extra = f" or {words[f.name]!r}" if f.name in words else ""
            raise UserError(f"{where} must be a whole number{extra}, got {value!r}")
        return value
    if kind.startswith("float"):
        if not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise UserError(f"{where} must be a string (quoted), got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value
