"""cao2's Python API: the functions every ``cao2`` command is a thin layer over.

    import cao2core as cao2
    run = cao2.distill(cao2.RunConfig(classes="0,1", ipc=1, out="x"))
    print(cao2.evaluate(cao2.EvalConfig(data=run.out)).accuracy)

Every function checks all its inputs before any work and raises ``cao2core.UserError`` (one line: what was wrong,
what to do) for bad input; results are dataclasses holding the figures and the paths written. Progress: a run's
bars follow ``RunConfig.progress``; pass ``progress=False`` to silence them or a callable to receive them
instead (see each function). ``docs/api.md`` has an example of each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .config import EvalConfig, RunConfig, replace

if TYPE_CHECKING:
    import torch

    from .generators.hookspecs import LatentSpec
    from .generators.host import Generator
    from .method.engine import RunResult
    from .scoring.evaluation import EvalResult
    from .share.export import ExportResult
    from .share.report import ReportResult
    from .studies.ablate import AblationResult
    from .studies.compare import CompareResult
    from .studies.sweep import SweepResult

RunProgress = Callable[[str, int, int], None]   # (stage, done, total): "sample pool"/"encode" in images, "CLO" in its


def distill(config: RunConfig, progress: bool | RunProgress | None = None) -> RunResult:
    """Distill a dataset: sample a pool per class, select (OSS), optimize the latents (CLO), decode and write the
    set into ``config.out``; resumes a folder of the same inputs. ``progress``: None = ``config.progress``'s
    bars; False = silent; a callable receives (stage, done, total) instead of the bars. With ``config.dry_run``
    nothing is written and ``RunResult.plan`` holds the projection."""
    from .method import distributed, engine
    config = _with_progress(config, progress)
    try:
        return engine.run(config, progress=progress if callable(progress) else None)
    finally:
        distributed.shutdown()


def refine(config: RunConfig, progress: bool | RunProgress | None = None) -> RunResult:
    """Apply CaO2 to existing images: ``config.images`` is a folder with one subfolder of images per class;
    they are encoded, selected when a class has more than ``config.ipc`` and optimized, then written as
    ``distill`` writes. ``progress`` as for ``distill`` (the first stage is "encode")."""
    from .errors import UserError
    if not config.images:
        raise UserError("refine needs images: a folder with one subfolder of images per class (--images DIR)")
    return distill(config, progress)


def evaluate(config: EvalConfig, progress: bool | Callable[[str], None] | None = None) -> EvalResult:
    """Score a set: train ``config.repeat`` students on ``config.data`` (or a real baseline) and test them on
    real held-out data; writes eval.json (default: DATA/eval/ of a run). ``progress``: None = lines on stderr
    unless ``config.quiet``; False = silent; a callable receives each line."""
    from .scoring.evaluation import evaluate as run_evaluation
    if progress is False:
        return run_evaluation(replace(config, quiet=True))
    return run_evaluation(config, log=progress if callable(progress) else None)


def compare(data: str, protocols: tuple[str, ...] | list[str] = ("hard", "rded"), settings: EvalConfig | None = None,
            out: str | None = None, full_real_acc: float | None = None, full_real: bool = False,
            ddrs_weight: float = 0.5) -> CompareResult:
    """The distilled set ``data`` against random real subsets of the same IPC, under each protocol, with the
    students of ``settings`` (an EvalConfig whose data, out and protocol are set per evaluation; default:
    quiet, one student). ``CompareResult.difference`` per protocol; writes compare.json and compare.md. With a
    full-data hard-label accuracy (``full_real_acc`` in %, or ``full_real=True`` to measure it with the same
    students), ``CompareResult.ddranking`` holds DD-Ranking's IOR, HLR and DDRS per protocol (w = ``ddrs_weight``)."""
    from .studies.compare import compare as run_compare
    return run_compare(data, list(protocols), settings, out, full_real_acc, full_real, ddrs_weight)


def ablate(config: RunConfig, settings: EvalConfig | None = None) -> AblationResult:
    """The paper's ablation of ``config``: its raw pool, OSS only, CLO only and OSS + CLO, on the same seeds,
    each in ``config.out``/<variant>/ and scored with the students of ``settings`` (default: 3 quiet students,
    on ``config.device``). Writes ablation.json, .md and .png."""
    from .studies.ablate import ablate as run_ablation
    return run_ablation(config, settings if settings is not None else study_settings(config))


def sweep(config: RunConfig, grid: dict[str, list], settings: EvalConfig | None = None,
          score: bool = True) -> SweepResult:
    """Every point of ``grid`` (``{"clo_lr": [6e-4, 1e-2], ...}``: RunConfig fields and their values) run on
    ``config``'s seeds in ``config.out``/<point>/, measured (how far CLO moved latents and pixels), and unless
    ``score`` is False scored with the students of ``settings`` (default as ``ablate``). Writes sweep.json,
    .md and .png."""
    from .studies.sweep import sweep as run_sweep
    if not score:
        return run_sweep(config, grid, None)
    return run_sweep(config, grid, settings if settings is not None else study_settings(config))


def export(data: str, format: str, to: str, push: str | None = None, token: str | None = None) -> ExportResult:
    """Write the finished run ``data`` into the new or empty folder ``to`` as ``format``: ``hf`` (a ``datasets``
    imagefolder with metadata.jsonl and a dataset card), ``rded`` (numeric class folders and class_map.txt) or
    ``tensors`` (images.pt and labels.pt as DD-Ranking loads them). ``push``: a Hub dataset repository to
    upload an hf export to (huggingface_hub, with ``token`` or the saved login)."""
    from .share.export import export as run_export
    return run_export(data, format, to, push, token)


def report(out: str, device: str = "auto") -> ReportResult:
    """Write OUT/report/index.html for the finished run ``out``: a static page (inline CSS, no network) with what
    was run, each class's images after CLO beside the same samples before CLO (decoded on ``device`` into
    OUT/report/before/), the judge's confidence, CLO's loss curves and the evaluations found under OUT/eval."""
    from .share.report import report as run_report
    return run_report(out, device)


def study_settings(config: RunConfig) -> EvalConfig:
    """The students of a study's runs by default: 3 per run, quiet, on the runs' device."""
    return EvalConfig(repeat=3, device=config.device, quiet=True)


@dataclass
class LoadedGenerator:
    """A generator plugin with its model loaded: what ``load_generator`` returns. ``sample`` and ``decode`` are
    the run's own code paths (every sample from its own seeded generator)."""

    generator: Generator        # the plugin's typed hooks
    handle: Any                 # the plugin's loaded model
    spec: LatentSpec            # latent shape, label space, CLO level range
    device: torch.device

    def sample(self, labels: list[int], seed: int = 0, first_index: int = 0) -> torch.Tensor:
        """Latents of ``labels`` (generator labels), sample i drawn from the unit generator of (seed, label,
        first_index + i), as a run draws its pool."""
        import torch

        from .generators.seeding import unit_generator
        generators = [unit_generator(seed, label, first_index + i, "sample") for i, label in enumerate(labels)]
        with torch.no_grad():
            return self.generator.sample(handle=self.handle, labels=torch.tensor(labels, device=self.device),
                                         generators=generators, snapshot_steps=[]).latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], (B, C, H, W)."""
        import torch
        with torch.no_grad():
            return self.generator.decode(handle=self.handle, latents=latents.to(self.device))


def load_generator(name: str = "dit", device: str = "auto", **options) -> LoadedGenerator:
    """Load an installed generator plugin (``cao2 plugins`` lists them) as a run would: ``options`` are the run's
    generic options (model, vae, dataset, sampler, sample_steps, guidance, dtype, ...) and the plugin's own
    ``--gen-opt`` keys; with none, the plugin's embedded world (DiT, MAR) is loaded."""
    from .environment import resolve_device
    from .generators.host import Host

    generic = {k: options.pop(k) for k in list(options) if k in RunConfig.__dataclass_fields__}
    config = RunConfig(generator=name, device=device, gen_opt=[f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()], **generic)
    generator = Host().generator(name)
    resolved = resolve_device(device)
    handle = generator.load(options=generator.parse_options(config.gen_options()), device=resolved)
    return LoadedGenerator(generator, handle, generator.latent_spec(handle=handle), resolved)


def _with_progress(config: RunConfig, progress) -> RunConfig:
    """The run's bars off when progress is silenced or sent to a receiver."""
    return replace(config, progress=False) if progress is False or callable(progress) else config
