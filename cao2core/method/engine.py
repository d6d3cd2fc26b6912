"""The distillation run: for each class, sample a pool, select (OSS), optimize (CLO), decode, store.

Read top to bottom to follow one class from the command line to its PNG files: ``run`` calls ``prepare``
(every input checked, nothing written), ``open_store``, ``plan_groups``, then ``distill_group`` for each group of
classes, whose stages are ``sample_pools``, ``select_samples``, ``optimize_latents`` and ``store_classes``, and
``finish``.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import __version__, kernels
from . import batchsize, clo, distributed, dryrun, oss, workplan
from ..generators import precision, weights
from ..data.classifiers import Classifier, load_classifier
from ..config import JUDGED_STRATEGIES, RunConfig
from ..environment import resolve_device, stderr_is_terminal, versions
from ..errors import UserError
from ..data.labels import LabelSpace, label_space
from ..generators.host import Generator, Host
from .pools import ImagePool, SampledPool, batches, in_chunks
from ..generators.seeding import STREAMS, unit_generator
from ..store import MANIFEST, Store, to_uint8
from ..store.images import thumbnails
from ..store.identity import file_hashes

PREVIEW_CLASSES, PREVIEW_IMAGES = 16, 8


@dataclass
class RunResult:
    """What a run did. ``out`` holds ``images/`` (the distilled set, an ImageFolder), ``latents/``,
    ``records/``, ``manifest.json`` and ``preview.png``."""

    out: Path
    completed: list[str]        # the class ids complete in ``out`` (this run's and earlier ones')
    written: int                # classes this run wrote (all ranks); the other completed ones were already there
    failed: dict[str, str]      # class id -> why it failed (not written; rerun to redo it)
    rank: int = 0
    plan: str | None = None     # --dry-run: what the run would do
    preview: bool = False       # preview.png was written

    @property
    def images(self) -> Path:
        return self.out / "images"

    @property
    def manifest(self) -> Path:
        return self.out / MANIFEST


@dataclass
class Job:
    """Everything a run needs, resolved and checked before anything is written."""

    cfg: RunConfig
    ranks: distributed.Ranks
    gen: Generator
    handle: object
    spec: object
    space: LabelSpace
    source: SampledPool | ImagePool
    clo: clo.CLOSettings
    classifier: Classifier | None
    targets: list[int] | None
    device: torch.device
    run_id: str
    conditions: dict[str, str]
    description: dict           # the generator's own record (cao2_describe)
    source_id: dict | None      # the refined folder's fingerprint (hashes every image: computed once)
    identity: dict              # everything that determines the output; run_id is its hash
    precision: dict = field(default_factory=dict)    # the numerics in effect, as the manifest records them
    selection_autocast: torch.dtype | None = None   # the selection's decode and classifier (--profile reference)


def run(cfg: RunConfig, host: Host | None = None, progress: Progress | None = None) -> RunResult:
    """Distill: check every input, then for each group of classes sample the pool, select (OSS), optimize (CLO),
    decode and store; each class appears on disk only when all its files are in place. ``progress`` receives the
    progress of every step and stage (``Progress``) instead of the lines and bars."""
    cfg.validate()
    ranks = distributed.init(cfg.device)         # torchrun: this process distills every world_size-th group
    job = prepare(cfg, host or Host(), ranks, progress)
    if job.cfg.dry_run:
        plan = dryrun.report(job.cfg, job.gen, job.handle, job.spec, job.space, job.clo, job.device, job.cfg.dry_run)
        return RunResult(Path(job.cfg.out), [], 0, {}, ranks.rank, plan)
    store = open_store(job)
    groups, todo = plan_groups(job, store)
    bars = ProgressBars(job, groups, todo, progress)
    for g, missing in todo:
        distill_group(job, store, groups[g], missing, bars)
    bars.close()
    return finish(job, store)


def prepare(cfg: RunConfig, host: Host, ranks, progress: Progress | None = None) -> Job:
    """Load the generator and classifier and check every option and input; writes nothing. Each step that can
    take minutes (loading, hashing the weights, the preflight) is announced as it starts and ends."""
    told = Announcer(cfg.progress and ranks.is_main and progress is None, progress)
    gen = host.generator(cfg.generator)
    device = resolve_device(distributed.rank_device(cfg.device, ranks))
    tf32 = precision.apply_tf32(device)             # before any forward pass, the preflight's included
    with told("load generator", cfg.generator + (f" {cfg.model}" if cfg.model else "")):
        handle = gen.load(options=gen.parse_options(cfg.gen_options()), device=device)
    spec = gen.latent_spec(handle=handle)
    declared = gen.label_spaces()
    space = resolve_classes(cfg, spec, declared)
    if cfg.images:      # cao2 refine: the pool is the given images; the classes are their folders
        source = ImagePool(cfg.images, label_space(space.name, declared), cfg, gen, handle, spec, device)
        space = source.space
    else:
        source = SampledPool(cfg, gen, handle, device)
    settings = clo.CLOSettings(cfg.clo_iters, cfg.clo_lr, cfg.clo_lambda, spec.level_range[0],
                               cfg.clo_tmax if cfg.clo_tmax is not None else spec.default_level_max)
    try:
        clo.check_levels(settings, spec.level_range)
    except UserError as exc:
        raise UserError(f"{exc}{cfg.origin('clo_tmax')}; --clo-tmax on the command line overrides it"
                        if cfg.origin("clo_tmax") else str(exc)) from None
    settings.kernels = resolve_kernels(cfg.kernels, device)
    if cfg.select == "stability" and (spec.sample_steps or 0) < 2:
        raise UserError(f"--select stability compares the sample one step before the end with the final one, but "
                        f"this sampler has {spec.sample_steps or 'no'} steps; use --sample-steps 2 or more, or "
                        "another --select")
    classifier = targets = None
    if cfg.select in JUDGED_STRATEGIES or cfg.condition == "auto":
        with told("load classifier", cfg.classifier or "the default judge"):
            classifier = load_classifier(cfg.classifier, space, device, cfg.classifier_arch, cfg.classifier_classes,
                                         classifier_input(cfg, spec))
        targets = classifier.output_indices(space)
    selection_amp = None
    if cfg.select in JUDGED_STRATEGIES:
        selection_amp = precision.selection_autocast(device, cfg.profile, spec.reference_selection_autocast)
        if cfg.profile == "reference" and spec.reference_selection_autocast and selection_amp is None \
                and ranks.is_main:
            print(f"cao2: --profile reference: the official code decodes and classifies the selection pool under "
                  f"{spec.reference_selection_autocast} autocast, a CUDA feature; on {device.type} they run in fp32",
                  file=sys.stderr)
    with told("hash", "the weights and inputs (sha256, cached)"):
        description = gen.describe(handle=handle)
        source_id = source.identity()
        identity = run_identity(cfg, gen, description, classifier, source_id, host)
    numerics = {"device": device.type, "tf32": tf32,
                "autocast_default": precision.default_autocast(device, cfg.profile, cfg.dtype),
                "selection_autocast": precision.dtype_name(selection_amp),
                "generator": {k: description[k] for k in ("dtype", "autocast", "clo_autocast") if k in description},
                "latents": "float32", "adam_state": "float32"}
    if tf32 or numerics["autocast_default"] != "none" or selection_amp is not None:
        # outputs change with these (a CPU run in fp32 has none, and keeps the run id it always had)
        identity["precision"] = {k: numerics[k] for k in ("tf32", "autocast_default", "selection_autocast")}
    rid = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    work = dryrun.Workload(cfg, gen, handle, space, settings, device, classifier)
    if cfg.batch_size == "auto":
        cfg = resolve_batch_size(cfg, ranks, work, rid, device)
    if not cfg.dry_run and not cfg.images:
        with told("preflight", f"every hook once on {min(2, cfg.batch_size)} samples"):
            preflight(work, cfg)
    return Job(cfg, ranks, gen, handle, spec, space, source, settings, classifier, targets, device, rid,
               condition_per_class(cfg, space, classifier), description, source_id, identity, numerics, selection_amp)


class Announcer:
    """Says when a step of ``prepare`` starts and ends (with its seconds): a line each on stderr when ``shown``,
    and (step, 0, 1), (step, 1, 1) to a Progress receiver."""

    def __init__(self, shown: bool, receiver: Progress | None):
        self.shown, self.receiver = shown, receiver

    @contextmanager
    def __call__(self, step: str, what: str):
        if self.shown:
            print(f"cao2: {step}: {what} ...", file=sys.stderr, flush=True)
        if self.receiver is not None:
            self.receiver(step, 0, 1)
        start = time.perf_counter()
        yield
        if self.shown:
            print(f"cao2: {step}: {what} in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
        if self.receiver is not None:
            self.receiver(step, 1, 1)


def preflight(work: dryrun.Workload, cfg: RunConfig) -> None:
    """Call every hook the run needs once, on two samples (within --batch-size), before anything is written: a
    plugin that breaks the contract fails here with an empty output folder rather than halfway through."""
    with torch.no_grad():
        latents = work.sample(min(2, cfg.batch_size))
    if cfg.select in JUDGED_STRATEGIES and work.classifier is not None:
        work.classify(latents)
    if cfg.clo_iters:
        try:
            work.optimize(latents, 1)
        except clo.NonFiniteLatents:
            pass                # a class's own failure: the run records it for that class and goes on
    work.decode(latents)


def open_store(job: Job) -> Store:
    """Check the output folder, then (rank 0) create it or take over this same run's; read its records."""
    header = manifest_header(job.cfg, job.gen, job.description, job.space, job.classifier, job.clo, job.precision)
    header["source"] = job.source_id
    header["identity"] = job.identity
    store = Store(Path(job.cfg.out), job.run_id, header, job.ranks.rank, job.ranks.world_size)
    store.check(job.cfg.overwrite)
    job.ranks.barrier()
    if job.ranks.is_main:
        store.open()                    # nothing is written before every input has been checked
    job.ranks.barrier()
    store.load()
    return store


def plan_groups(job: Job, store: Store) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
    """The class groups, and this rank's share of those with an incomplete class: [(group, its incomplete
    positions)].

    Classes share forward passes in groups fixed by the class list and batch size, not by the ranks. Each rank
    checks the files of every N-th group against their records; the groups left to do are dealt out over the
    ranks, so a resume stays balanced. A group with an incomplete class is computed again in full (at most one
    chunk's work repeated), so its chunks hold the same samples."""
    space, ranks = job.space, job.ranks
    groups = workplan.class_groups([job.source.keep(cid) for cid in space.ids], job.cfg.batch_size)
    checked = {g: [p for p in groups[g] if not store.is_complete(space.ids[p])]
               for g in ranks.shard(range(len(groups)))}
    todo = ranks.spread(sorted((g, missing) for part in ranks.gather(checked)
                               for g, missing in part.items() if missing))
    for cid, why in store.redone.items():
        print(f"cao2: class {cid} will be redone: {why}", file=sys.stderr)
    if ranks.is_main and ranks.world_size > len(groups):
        print(f"cao2: {len(groups)} class group(s) for {ranks.world_size} ranks: {ranks.world_size - len(groups)} "
              "rank(s) have nothing to do (a smaller --batch-size makes more groups)", file=sys.stderr)
    return groups, todo


Progress = Callable[[str, int, int], None]
"""A progress receiver: called with (stage, units done, units in all) as a run moves. The stages, in order: "load
generator", "load classifier", "hash" (the weights' sha256) and "preflight", each (0, 1) when it starts and (1, 1)
when it ends; then "sample pool" (or "encode" for refine), "select" (the pool decoded and classified) and "decode"
(the kept latents after CLO) counted in images, and "CLO" counted in iterations."""


# a log's progress lines within a stage (stderr not a terminal): at a tenth of the stage done, if this long since the
# stage's last line, and in any case after the longer wait (an ImageNet-1K stage runs for hours: a batch job's log
# should say it is alive without growing by a line per batch)
LOG_LINE_AFTER_S, LOG_LINE_AT_MOST_S = 30.0, 600.0


class StageBar:
    """One stage's progress: a tqdm bar (drawn when the run shows bars) that also tells a Progress receiver. When
    stderr is not a terminal (a log file, a pipe) no bar is drawn: one line when the stage starts, one when it
    ends, with its count and time, and between them a line at each tenth done (at most one each
    ``LOG_LINE_AFTER_S``, at least one each ``LOG_LINE_AT_MOST_S``). The bar closes when its last unit is done; its
    time is the time spent inside the stage (``running``), not the run's."""

    def __init__(self, stage: str, total: int, unit: str, shown: bool, suffix: str, receiver: Progress | None):
        self.stage, self.total, self.done, self.receiver = stage, total, 0, receiver
        self.lines = shown and total > 0 and not stderr_is_terminal()
        self.label, self.unit, self.started = stage + suffix, unit, None
        self.bar = tqdm(total=total, desc=stage + suffix, unit=unit, disable=not shown or self.lines or not total)
        self.spent, self.inside, self.closed = 0.0, False, False
        self.entered = self.last_line = 0.0     # when ``running`` was entered; when the last log line was printed
        self.tenths = 0                         # the tenths of the stage the log lines have reported

    def begin(self) -> None:
        """The stage's first work: its line, and its bar's clock (not started when the run made the bars)."""
        if self.started is not None or self.closed or not self.total:
            return
        self.started = self.last_line = time.perf_counter()
        self.bar.reset(self.total)
        if self.lines:
            print(f"cao2: {self.label}: {self.total} {self.unit} ...", file=sys.stderr, flush=True)

    def own_seconds(self) -> float:
        """The time spent inside the stage so far."""
        return self.spent + (time.perf_counter() - self.entered if self.inside else 0.0)

    def log_line(self) -> None:
        """A line in the log between the stage's first and last, when a tenth more is done or it has been long."""
        now, tenths = time.perf_counter(), self.done * 10 // self.total
        since = now - self.last_line
        if self.done < self.total and ((tenths > self.tenths and since >= LOG_LINE_AFTER_S)
                                       or since >= LOG_LINE_AT_MOST_S):
            self.tenths, self.last_line = tenths, now
            print(f"cao2: {self.label}: {self.done}/{self.total} {self.unit} ({100 * self.done // self.total}%), "
                  f"{self.own_seconds():.1f}s so far", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        if not n:
            return      # a sampler step that completed no sample: nothing to tell the bar or the receiver
        self.begin()
        self.done += n
        self.bar.update(n)
        if self.lines:
            self.log_line()
        if self.receiver is not None:
            self.receiver(self.stage, self.done, self.total)
        if self.done >= self.total and not self.inside:
            self.close()

    @contextmanager
    def running(self):
        """The stage at work: its time adds to the stage's; the bar closes at the end if all units are done."""
        self.begin()
        self.entered, self.inside = time.perf_counter(), True
        try:
            yield
        finally:
            self.inside = False
            self.spent += time.perf_counter() - self.entered
        if self.done >= self.total:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        if self.lines and self.started is not None:
            seconds = self.spent or time.perf_counter() - self.started
            print(f"cao2: {self.label}: {self.done}/{self.total} {self.unit} in {seconds:.1f}s", file=sys.stderr,
                  flush=True)


class ProgressBars:
    """The progress of a run's stages: bars on stderr when ``--progress`` (under torchrun only rank 0 draws them:
    the groups are dealt in turn, so its share stands for every rank's), and a Progress receiver if given."""

    def __init__(self, job: Job, groups, todo, receiver: Progress | None = None):
        shown = job.cfg.progress and job.ranks.is_main and receiver is None
        of_ranks = f" (rank 0 of {job.ranks.world_size})" if job.ranks.world_size > 1 else ""
        ids, src, size = job.space.ids, job.source, job.cfg.batch_size
        pools = sum(src.size(ids[p]) for g, _ in todo for p in groups[g])
        kept = sum(src.keep(ids[p]) for g, _ in todo for p in groups[g])
        self.sample = StageBar("encode" if job.cfg.images else "sample pool", pools, "img", shown, of_ranks,
                               receiver)
        # select_samples decodes and classifies each pool (and, for stability, its snapshots too)
        self.select = StageBar("select", pools if job.cfg.select in JUDGED_STRATEGIES else 0, "img",
                               shown, of_ranks, receiver)
        self.clo = StageBar("CLO", sum(workplan.chunks(sum(src.keep(ids[p]) for p in groups[g]), size)
                                       for g, _ in todo) * job.cfg.clo_iters, "it", shown, of_ranks, receiver)
        self.decode = StageBar("decode", kept, "img", shown, of_ranks, receiver)

    def clo_step(self, n: int) -> None:
        self.clo.update(n)

    def close(self) -> None:
        for bar in (self.sample, self.select, self.clo, self.decode):
            bar.close()


def distill_group(job: Job, store: Store, group: list[int], missing: list[int], bars: ProgressBars) -> None:
    """One group of classes from pool to PNG files; only the classes in ``missing`` are written."""
    cids, labels = [job.space.ids[p] for p in group], [job.space.generator_labels[p] for p in group]
    times = {}
    t0 = time.perf_counter()
    with bars.sample.running():
        pools = sample_pools(job, cids, labels, bars)
    times["sample"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with bars.select.running(), precision.autocast(job.device, job.selection_autocast):
        kept = select_samples(job, group, cids, labels, pools)
        if job.cfg.select in JUDGED_STRATEGIES:
            bars.select.update(sum(len(pool) for pool, _ in pools))
    latents_init = torch.cat([pool[keep.to(pool.device)] for (pool, _), (keep, _) in zip(pools, kept)])
    times["select"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with bars.clo.running():
        latents, bad, curves = optimize_latents(job, cids, labels, kept, latents_init, bars)
    times["clo"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    def decode(z: torch.Tensor) -> torch.Tensor:
        pixels = job.gen.decode(handle=job.handle, latents=z).cpu()
        bars.decode.update(len(z))
        return pixels

    with bars.decode.running():
        pixels = in_chunks(decode, latents, job.cfg.batch_size)
    times["decode"] = time.perf_counter() - t0
    store_classes(job, store, group, missing, kept, latents_init, latents, curves, pixels, bad,
                  {k: round(v, 3) for k, v in times.items()})


def sample_pools(job: Job, cids: list[str], labels: list[int], bars: ProgressBars) -> list[tuple[torch.Tensor, object]]:
    """1. Each class's pool (and its state one sampler step before the end, for ``stability``): sampled by the
    generator, each sample from its own seed (refine: the given images, encoded)."""
    return job.source.latents(list(zip(cids, labels)), job.cfg.batch_size, bars.sample)


def select_samples(job: Job, group: list[int], cids: list[str], labels: list[int], pools
                   ) -> list[tuple[torch.Tensor, oss.Selection]]:
    """2. OSS: (kept pool indices in selection order, their scores and the pool record) per class; the pool is
    classified after decoding, as the classifier input says. Where it is classified (confidence, stability), the
    record keeps what the judge said of every pool sample and small thumbnails of the final decode."""
    cfg = job.cfg
    if cfg.select in JUDGED_STRATEGIES:
        probs, thumbs = classify(job.gen, job.handle, job.classifier, [p for p, _ in pools], cfg.batch_size,
                                 oss.POOL_THUMB_PX)
        if cfg.select == "stability":
            probs_before, _ = classify(job.gen, job.handle, job.classifier, [b for _, b in pools], cfg.batch_size)
    kept = []
    for k, (pos, cid, label) in enumerate(zip(group, cids, labels)):
        ipc = job.source.keep(cid)
        if cfg.select in JUDGED_STRATEGIES:
            target = job.targets[pos]
            if cfg.select == "confidence":
                keep = oss.select_confidence(probs[k], target, ipc, cfg.order)
                score = oss.scores_of(probs[k], target)
            else:
                keep = oss.select_stability(probs_before[k], probs[k], ipc)
                if cfg.profile == "reference":      # the files, and the pool record's ranks, in the official order
                    keep = oss.official_stability_order(keep)
                score = oss.stability_of(probs_before[k], probs[k])
            kept.append((keep, oss.judged_selection(cfg.select, probs[k], target, keep, score, thumbs[k])))
            continue
        keep = (oss.select_random(job.source.size(cid), ipc, unit_generator(cfg.seed, label, 0, "select"))
                if cfg.select == "random" else torch.arange(ipc))
        kept.append((keep, oss.Selection(torch.full((ipc,), float("nan")))))
    return kept


def optimize_latents(job: Job, cids: list[str], labels: list[int], kept, latents_init: torch.Tensor, bars: ProgressBars
                     ) -> tuple[torch.Tensor, dict[str, str], dict[str, torch.Tensor]]:
    """3. CLO on the group's selected latents in chunks, each row with its own condition, noise and level draws.
    Returns the latents, {class: why it failed} for classes whose samples or latents are not finite, and each
    row's loss terms per iteration ({"mean", "max"}: (rows, iters))."""
    cfg = job.cfg
    rows = [(cid, label, i) for cid, label, (keep, _) in zip(cids, labels, kept) for i in range(len(keep))]
    # a non-finite start is the generator's fault, not CLO's: checked on the device, one sync per group (a
    # sampled pool's were refused where cao2_sample returned them; what is left is an image cao2_encode broke)
    finite = torch.isfinite(latents_init.flatten(1)).all(1).tolist()
    made_by = "cao2_encode" if job.cfg.images else "cao2_sample"
    bad = {rows[k][0]: (f"non-finite latents from the generator ({job.gen.label}, {made_by}): NaN or Inf in "
                        f"pool item {rows[k][2]}") for k in range(len(rows)) if not finite[k]}
    first_bad: dict[str, dict[int, int]] = {}
    latents, curves = [], {"mean": [], "max": []}
    for idx in batches(range(len(rows)), cfg.batch_size):
        units = [rows[k] for k in idx]
        chunk_curves = {"mean": torch.zeros(len(idx), 0), "max": torch.zeros(len(idx), 0)}
        z, chunk_bad = clo.optimize_rows(
            job.gen, job.handle, latents_init[idx], torch.tensor([l for _, l, _ in units], device=job.device),
            [job.conditions[c] for c, _, _ in units], [unit_generator(cfg.seed, l, i, "clo-noise") for _, l, i in units],
            [unit_generator(cfg.seed, l, i, "clo-level") for _, l, i in units], job.clo, bars.clo_step, chunk_curves)
        latents.append(z)
        for k in curves:
            curves[k].append(chunk_curves[k])
        for k, it in chunk_bad.items():
            c, _, i = units[k]
            first_bad.setdefault(c, {})[i] = it
    for c, rows_bad in first_bad.items():
        bad.setdefault(c, f"{clo.NonFiniteLatents.first_of(rows_bad)}; lower --clo-lr")
    return torch.cat(latents), bad, {k: torch.cat(v) for k, v in curves.items()}


def store_classes(job: Job, store: Store, group, missing, kept, latents_init, latents, curves, pixels, bad,
                  seconds) -> None:
    """4. Write each class of the group that was missing: PNGs, latents (with CLO's loss curves) and its record
    (written last); a class with non-finite values is recorded as failed instead."""
    first = 0
    cids = [job.space.ids[p] for p in group]
    for pos, cid, (keep, selection) in zip(group, cids, kept):
        ipc, rows_of = len(keep), slice(first, first + len(keep))
        first += ipc
        label = job.space.generator_labels[pos]
        if pos not in missing:
            continue            # computed again only because its group had an incomplete class
        if cid in bad:
            store.set_status(cid, {"status": "failed", "reason": bad[cid], "label": pos, "generator_label": label})
            continue
        tensors = {"latents": latents[rows_of], "latents_init": latents_init[rows_of],
                   "labels": torch.full((ipc,), label), "scores": selection.scores.float(), "pool_index": keep.long(),
                   "clo_loss_mean": curves["mean"][rows_of], "clo_loss_max": curves["max"][rows_of],
                   **selection.pool}
        entry = {"name": job.space.names[pos], "label": pos, "generator_label": label,
                 "condition": job.conditions[cid], "pool": job.source.size(cid), "kept": ipc, "group": cids,
                 "group_seconds": seconds, "rank": job.ranks.rank}
        if selection.record is not None:        # which pool fields latents/<class>.safetensors holds
            entry["pool_record"] = selection.record
        store.write_class(cid, pixels[rows_of], tensors, entry)


def finish(job: Job, store: Store) -> RunResult:
    """Every rank's classes are written: the ranks send each other their new records, rank 0 writes the manifest
    (listing them all) and the preview."""
    ranks = job.ranks
    sent = ranks.gather(store.this_run)
    written = sum(e["status"] == "complete" for entries in sent for e in entries.values())
    if ranks.is_main:
        store.finish(sent)
    else:
        store.collect(sent)
    failed = {c: e.get("reason", "") for c, e in store.manifest["classes"].items() if e.get("status") == "failed"}
    completed = [c for c in job.space.ids if store.recorded_complete(c)]
    preview = False
    if ranks.is_main:
        preview = write_preview(store, job.gen, job.handle, completed, job.device, job.cfg.batch_size)
    ranks.barrier()
    return RunResult(Path(job.cfg.out), completed, written, failed, ranks.rank, preview=preview)


def classify(gen: Generator, handle, classifier: Classifier, pools: list[torch.Tensor], batch_size: int,
             thumb_px: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Classifier probabilities of each pool's decoded latents and, with ``thumb_px``, each sample's thumbnail
    (uint8 (h, w, C), longest side at most ``thumb_px``) from the same decode; the pools share chunks of
    --batch-size, so no decode sees more."""
    thumbs = []

    def judge(z: torch.Tensor) -> torch.Tensor:
        pixels = gen.decode(handle=handle, latents=z)
        if thumb_px:
            thumbs.append(thumbnails(pixels, thumb_px))
        return classifier.probs(pixels).cpu()

    sizes = [len(p) for p in pools]
    probs = in_chunks(judge, torch.cat(pools), batch_size)
    return list(probs.split(sizes)), list(torch.cat(thumbs).split(sizes)) if thumb_px else None


def write_preview(store: Store, gen: Generator, handle, class_ids: list[str], device, batch_size: int) -> bool:
    """Selected latents before and after CLO, decoded side by side, for the first classes; False if none."""
    rows = []
    for cid in class_ids[:PREVIEW_CLASSES]:
        t = store.load_latents(cid)
        n = min(PREVIEW_IMAGES, len(t["latents"]))
        both = torch.cat([t["latents_init"][:n], t["latents"][:n]]).to(device)
        img = to_uint8(in_chunks(lambda z: gen.decode(handle=handle, latents=z), both, batch_size))
        rows.append((img[:n], img[n:]))
    if rows:
        entries = store.manifest.get("classes") or {}
        store.write_preview(rows, names=[(entries.get(c) or {}).get("name", c) for c in class_ids[:len(rows)]])
    return bool(rows)


def resolve_batch_size(cfg: RunConfig, ranks, work: dryrun.Workload, rid: str, device: torch.device) -> RunConfig:
    """``--batch-size auto`` made a number: the one an earlier run of this configuration in --out recorded
    (so a resume fills the same chunks), else measured on this device (see ``batchsize``)."""
    size = batchsize.recorded(Path(cfg.out), rid)
    if size is not None:
        how = f"as recorded by the run in {cfg.out}"
    elif device.type != "cuda":
        size, how = batchsize.CPU_BATCH, "the CPU default; memory is probed on GPUs only"
    else:
        size, fits = batchsize.probe(batchsize.workload_stages(work, cfg.clo_iters), batchsize.CudaMeter(device))
        size = min(ranks.gather(size))
        how = "largest that fits the free memory of every rank; by stage here: " + \
              ", ".join(f"{k} {v}" for k, v in fits.items())
    if ranks.is_main:
        print(f"cao2: --batch-size auto = {size} ({how})", file=sys.stderr)
    return replace(cfg, batch_size=size)


def resolve_kernels(backend: str, device: torch.device) -> str:
    """The kernel backend CLO will use (builds the native ops now, so a failure comes before any output)."""
    try:
        return kernels.resolve(backend, device)
    except (kernels.KernelUnavailable, ValueError) as exc:
        raise UserError(f"{exc}; choose another --kernels (auto, torch, ...)") from None


def resolve_classes(cfg: RunConfig, spec, declared: dict) -> LabelSpace:
    """The run's classes: ``--dataset`` (or the generator's own label space) narrowed by ``--classes``;
    ``declared``: the generator plugin's own label spaces."""
    dataset = cfg.dataset or spec.label_space
    if dataset is None:
        raise UserError("this generator takes any label space: pass --dataset (a shipped one or a file with one "
                        "class per line, ID [NAME])")
    try:
        space = label_space(dataset, declared)
    except UserError:
        if cfg.dataset:
            raise
        raise UserError(f"generator {cfg.generator} says its labels follow label space {dataset!r}, which neither "
                        "cao2 nor the plugin declares (cao2_label_spaces); pass --dataset with a file of its classes "
                        "(ID [NAME] per line, in the generator's label order)") from None
    space = space.select(cfg.classes)
    if spec.label_space is not None and spec.label_space != space.generator_space:
        raise UserError(f"dataset {dataset} uses {space.generator_space} labels but the generator was trained on "
                        f"{spec.label_space}; pass a matching --dataset or --model")
    bad = [l for l in space.generator_labels if not 0 <= l < spec.num_classes]
    if bad:
        raise UserError(f"class id {bad[0]} is out of range for this generator's {spec.num_classes} classes")
    return space


def classifier_input(cfg: RunConfig, spec) -> str:
    """What the selection classifier sees: ``--classifier-input``, else the generator's official input under
    ``--profile reference``, else the classifier's own preprocessing."""
    if cfg.classifier_input:
        return cfg.classifier_input
    # the plugin's value was checked against CLASSIFIER_INPUTS where latent_spec returned it (contract.check_spec)
    return spec.reference_classifier_input if cfg.profile == "reference" else "timm"


def condition_per_class(cfg: RunConfig, space: LabelSpace, classifier: Classifier | None) -> dict[str, str]:
    """The CLO condition of each class; ``auto`` = task-oriented: class label if the class is easy, else null."""
    if cfg.condition != "auto":
        return {cid: cfg.condition for cid in space.ids}
    if cfg.class_accuracy:
        try:
            acc = json.loads(Path(cfg.class_accuracy).read_text())
            if not isinstance(acc, dict):
                raise ValueError
        except (OSError, ValueError):
            raise UserError(f"--class-accuracy {cfg.class_accuracy} is not a readable JSON object "
                            "{class id: accuracy}") from None
        for cid, value in acc.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= 1:
                raise UserError(f"--class-accuracy {cfg.class_accuracy}: class {cid!r} has accuracy {value!r}; "
                                "give each class a number in [0, 1]")
        acc = {str(k): float(v) for k, v in acc.items()}
    else:
        acc = classifier.class_accuracy if classifier else {}
    missing = [c for c in space.ids if c not in acc]
    if missing:
        raise UserError(f"--condition auto needs the classifier's validation accuracy of class {missing[0]!r}; "
                        "pass --class-accuracy FILE or choose --condition class|null|zero")
    return {c: "class" if acc[c] >= cfg.condition_threshold else "null" for c in space.ids}


def run_identity(cfg: RunConfig, gen: Generator, description: dict, classifier: Classifier | None,
                 source: dict | None, host: Host) -> dict:
    """Everything that determines the output: the configuration, the sha256 of every file read (every sha256 the
    generator's description reports, the classifier, the class list and accuracy files, the refined images), the
    generator plugin's distribution and version, the cross-cutting plugins and cao2's version. A run resumes an
    output only if this is unchanged."""
    files = file_hashes(description, "generator.")
    if classifier is not None:
        files["classifier"] = classifier.sha256 or classifier.source
    for flag in ("classifier_classes", "class_accuracy"):
        path = getattr(cfg, flag)
        if path and Path(path).is_file():
            files[flag] = weights.file_sha256(path)
    if source is not None:
        files["images"] = source["sha256"]
    return {"config": cfg.output_key(), "files": files,
            "generator": {"name": gen.name, "distribution": gen.distribution, "version": gen.version},
            "plugins": host.active_plugins(), "cao2": __version__}


UNORDERED_KEYS = ("_use_default_values",)   # diffusers: the config keys it filled in, a list built from a set


def settled(value):
    """A generator's description with the lists that come from sets (diffusers' ``_use_default_values``, in an
    order that changes per process) sorted, so manifests of identical runs are identical."""
    if isinstance(value, dict):
        return {k: sorted(v, key=str) if k in UNORDERED_KEYS and isinstance(v, (list, tuple, set)) else settled(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [settled(v) for v in value]
    return value


def manifest_header(cfg, gen: Generator, description: dict, space: LabelSpace, classifier, settings,
                    numerics: dict | None = None) -> dict:
    return {
        "config": {**cfg.output_key(), "clo_tmax": settings.level_max},
        "kernels": settings.kernels,
        # the numerics in effect: device type, TF32 flags (None: a CPU), the autocast cao2 defaults to, the
        # generator's own (as it describes it), the selection's (--profile reference), latents and Adam in fp32
        "precision": numerics or {},
        "batch_size": cfg.batch_size,       # fixes which samples share a chunk; a resumed --batch-size auto reuses it
        "versions": {"cao2": __version__, **versions("diffusers", "timm", "safetensors", "pluggy")},
        "command": " ".join(sys.argv),
        "generator": {"name": gen.name, "distribution": gen.distribution, "version": gen.version,
                      "contract": ".".join(map(str, gen.contract)), **settled(description)},
        "classifier": None if classifier is None else {"source": classifier.source, "sha256": classifier.sha256,
                                                       "input": classifier.input},
        "dataset": space.name,
        "generator_space": space.generator_space,   # whose label order generator_labels index
        "class_ids": list(space.ids),
        "class_names": list(space.names),
        "generator_labels": list(space.generator_labels),
        "seeds": {"run_seed": cfg.seed, "unit_seed": "sha256('cao2/{seed}/{generator label}/{index}/{stream}')[:8]",
                  "streams": list(STREAMS)},
    }
