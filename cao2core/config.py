"""The run configuration: one table of options drives ``cao2 run``'s flags, ``--config`` TOML keys and defaults."""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import UserError
from .generators.hookspecs import CLASSIFIER_INPUTS, CONDITION_KINDS, GENERIC_OPTIONS
from .kernels import BACKENDS as KERNEL_BACKENDS
from .distill.oss import ORDERS, STRATEGIES

CONDITIONS = CONDITION_KINDS + ("auto",)
PROFILES = ("default", "reference")


def _opt(default, help, choices=None, affects_output=True, commands=("run", "refine"), **kw):
    meta = dict(help=help, choices=choices, affects_output=affects_output, commands=commands, **kw)
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    generator: str = _opt("dit", "generator plugin (see `cao2 plugins`)")
    model: str | None = _opt(None, "generator checkpoint: a diffusers folder, an original checkpoint file or a hub "
                                   "id; default: the generator's embedded MNIST world")
    vae: str | None = _opt(None, "VAE folder or hub id; default: the one beside --model, else the generator's default")
    classifier: str | None = _opt(None, "selection classifier: a timm model name or a local checkpoint; default: "
                                        "the embedded MNIST judge, resnet18.tv_in1k for ImageNet")
    classifier_arch: str | None = _opt(None, "timm architecture of a --classifier checkpoint that does not name it")
    classifier_classes: str | None = _opt(None, "file of the classifier's class ids in output order (one per line)")
    classifier_input: str | None = _opt(None, "what the selection classifier sees: timm = clamp to [0, 1] and the "
                                              "classifier's own preprocessing; raw = the decoder output resized "
                                              "to the classifier's input size, nothing else (the official DiT "
                                              "scripts); jpeg = a JPEG round trip, resize 224 and ImageNet "
                                              "normalization (the official MAR script); default: timm, or the "
                                              "generator's official input under --profile reference",
                                        CLASSIFIER_INPUTS)
    dataset: str | None = _opt(None, "label space: mnist, nette, woof, in100, in1k, a generator's own "
                                     "(cifar10, ...) or a file of ID [NAME] lines; default: the generator's own")
    classes: str | None = _opt(None, "subset of classes: comma-separated ids or positions, A-B ranges; default: all")
    images: str | None = _opt(None, "folder of existing images to refine, one subfolder per class (class id or "
                                    "class name)", commands=("refine",))
    ipc: int | str = _opt(10, "images per class to distill (refine: or 'all' = every given image)", parse="ipc")
    pool_factor: int = _opt(4, "pool size per class = pool-factor x IPC (m in the paper)", commands=("run",))
    select: str = _opt("confidence", "selection strategy", STRATEGIES)
    order: str = _opt("easy", "confidence order: easy = most confident first, hard = least first", ORDERS)
    clo_iters: int = _opt(100, "CLO iterations (0 = selection only)")
    clo_lr: float = _opt(6e-4, "CLO Adam learning rate")
    clo_lambda: float = _opt(10.0, "weight of the L-infinity term of the CLO loss")
    clo_tmax: int | None = _opt(None, "largest CLO corruption level T-hat; default: the generator's (DiT: 224, "
                                      "or 11 with --timestep-convention reference; MAR: 999, the bound of the "
                                      "head's per-token timestep)")
    condition: str = _opt("null", "CLO condition per class: class label, null (CFG) label, zero label embedding, "
                                  "or auto = class label for easy classes, null for hard ones", CONDITIONS)
    condition_threshold: float = _opt(0.7, "auto: classes whose classifier validation accuracy is at least this "
                                           "use the class label")
    class_accuracy: str | None = _opt(None, "auto: JSON file {class id: validation accuracy}; default: the "
                                            "classifier checkpoint's own record")
    timestep_convention: str | None = _opt(None, "DiT CLO timesteps: default = model told the noise level's own "
                                                 "t; reference = as the official code (respaced noise, raw index); "
                                                 "default: the --profile's", ("default", "reference"))
    sampler: str | None = _opt(None, "generator sampler (DiT: ddpm or ddim; SD: a diffusers scheduler name such as "
                                     "ddim, dpm, euler; MAR has one); default: the generator's")
    sample_steps: int | None = _opt(None, "sampling steps; default: the generator's (DiT: 50; MAR: 32 AR steps; "
                                          "SD: 50)")
    guidance: float | None = _opt(None, "classifier-free guidance scale; default: the generator's (DiT-XL/2: 2.7, "
                                        "MAR: 2.9, SD: 7.5)")
    gen_opt: list = _opt(list, "generator-specific option KEY=VALUE (repeatable)", nargs="append_kv")
    profile: str = _opt("default", "default = the corrected method; reference = everything the official CaO2 code "
                                   "does that the default corrects (timestep convention, guidance channels, "
                                   "classifier input; see docs/fidelity.md), for reproducing a paper number",
                        PROFILES)
    kernels: str = _opt("auto", "CLO loss/Adam kernels: auto = triton or cuda on GPUs, cpp on CPUs, else torch; "
                                "the CAO2_KERNELS environment variable overrides auto", KERNEL_BACKENDS,
                        affects_output=False)
    batch_size: int | str = _opt(64, "samples per forward pass (sampling, scoring, CLO, decoding); classes whose "
                                     "kept latents fit one chunk share it; auto = the largest that fits the GPU's "
                                     "free memory (CPU: 64; a resumed run reuses the recorded size)",
                                 affects_output=False, parse="batch_size")
    seed: int = _opt(0, "run seed; every draw comes from a generator seeded by (seed, class, index)")
    device: str = _opt("auto", "torch device: auto, cpu, cuda, cuda:N", affects_output=False)
    dtype: str = _opt("fp32", "generator weights dtype", ("fp32", "bf16", "fp16"))
    out: str = _opt("out/cao2", "output folder", affects_output=False)
    dry_run: int | None = _opt(None, "print the work, FLOPs and projected time for RANKS ranks (default 1), "
                                     "measured on one chunk; write nothing", affects_output=False,
                               commands=("run",), parse="dry_run")
    overwrite: bool = _opt(False, "replace an output folder that holds a run of another configuration",
                           affects_output=False)
    progress: bool = _opt(True, "show progress bars", affects_output=False)

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

    def output_key(self) -> dict:
        """The options that change what is written: a rerun with the same key may resume the output."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["affects_output"]}

    def gen_options(self) -> dict:
        opts = {k: getattr(self, k) for k in GENERIC_OPTIONS}
        for item in self.gen_opt:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--gen-opt {item!r} is not KEY=VALUE")
            opts[key.replace("-", "_")] = value
        return opts


def load_toml(path: str) -> dict:
    """Read a --config file; keys are the flag names (dashes or underscores), values of the flags' types."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name: f for f in fields(RunConfig)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"config file {path}: unknown key {key!r}; keys are the `cao2 run` flag names")
        out[name] = typed(known[name], value, f"config file {path}: {key}")
    return out


WORDS = {"ipc": "all", "batch_size": "auto"}      # the word a count flag takes besides a number


def base_type(f) -> str:
    """A RunConfig field's type without ``| None`` (and any other alternative): "int", "float", "bool", "str"."""
    return str(f.type).split("|")[0].strip()


def typed(f, value, where: str):
    """A --config value checked against its flag's type and choices (TOML's own types: no "false" for false)."""
    kind, words = base_type(f), WORDS
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
