"""The distillation run: for each class, sample a pool, select (OSS), optimize (CLO), decode, store.

Read ``run`` top to bottom to follow one class from the command line to its PNG files.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__, batchsize, clo, distributed, dryrun, kernels, select, workplan
from .classifiers import INPUTS as CLASSIFIER_INPUTS
from .classifiers import Classifier, load_classifier
from .config import RunConfig
from .errors import UserError
from .labels import LabelSpace, label_space
from .plugins import Generator, Host
from .pools import ImagePool, SampledPool, batches, in_chunks
from .seeding import STREAMS, unit_generator
from .store import Store, to_uint8

PREVIEW_CLASSES, PREVIEW_IMAGES = 16, 8


@dataclass
class RunResult:
    out: Path
    completed: list[str]
    written: int                # classes this run wrote (all ranks); the other completed ones were already there
    failed: dict[str, str]
    rank: int = 0
    plan: str | None = None     # --dry-run: what the run would do


def run(cfg: RunConfig, host: Host | None = None) -> RunResult:
    cfg.validate()
    ranks = distributed.init(cfg.device)         # torchrun: this process distills every world_size-th class
    host = host or Host()
    gen = host.generator(cfg.generator)
    device = resolve_device(distributed.rank_device(cfg.device, ranks))
    handle = gen.load(options=cfg.gen_options(), device=device)
    spec = gen.latent_spec(handle=handle)

    space = resolve_classes(cfg, spec)
    if cfg.images:      # cao2 refine: the pool is the given images; the classes are their folders
        source = ImagePool(cfg.images, label_space(space.name), cfg, gen, handle, spec, device)
        space = source.space
    else:
        source = SampledPool(cfg, gen, handle, device)
    clo_settings = clo.CLOSettings(cfg.clo_iters, cfg.clo_lr, cfg.clo_lambda, spec.level_range[0],
                                   cfg.clo_tmax if cfg.clo_tmax is not None else spec.default_level_max)
    clo.check_levels(clo_settings, spec.level_range)
    clo_settings.kernels = resolve_kernels(cfg.kernels, device)
    if cfg.select == "stability" and (spec.sample_steps or 0) < 2:
        raise UserError(f"--select stability compares the sample one step before the end with the final one, but "
                        f"this sampler has {spec.sample_steps or 'no'} steps; use --sample-steps 2 or more, or "
                        "another --select")
    classifier = None
    if cfg.select in ("confidence", "stability") or cfg.condition == "auto":
        classifier = load_classifier(cfg.classifier, space, device, cfg.classifier_arch, cfg.classifier_classes,
                                     classifier_input(cfg, spec))
        targets = classifier.output_indices(space)
    source_id = source.identity()
    rid = run_id(cfg, source_id)
    if cfg.batch_size == "auto":
        cfg = resolve_batch_size(cfg, ranks, dryrun.Workload(cfg, gen, handle, space, clo_settings, device,
                                                             classifier), rid, device)
    if cfg.dry_run:
        plan = dryrun.report(cfg, gen, handle, spec, space, clo_settings, device, cfg.dry_run)
        return RunResult(Path(cfg.out), [], 0, {}, ranks.rank, plan)
    conditions = condition_per_class(cfg, space, classifier)

    header = manifest_header(cfg, gen, handle, space, classifier, clo_settings)
    header["source"] = source_id
    store = Store(Path(cfg.out), rid, header, ranks.rank, ranks.world_size)
    store.check(cfg.overwrite)
    ranks.barrier()
    if ranks.is_main:
        store.open()                    # nothing is written before every input has been checked
    ranks.barrier()
    store.load()

    # classes share forward passes in groups (fixed by the class list and batch size, not by the ranks);
    # each rank checks the files of every N-th group against their records, then the groups left to do are
    # dealt out over the ranks (a resume stays balanced); a group with an incomplete class is computed again in
    # full (at most one chunk's work repeated), so its chunks match
    groups = workplan.class_groups([source.keep(cid) for cid in space.ids], cfg.batch_size)
    checked = {g: [p for p in groups[g] if not store.is_complete(space.ids[p])]
               for g in ranks.shard(range(len(groups)))}
    # (group, its incomplete positions): the rank that writes a group need not hash its complete classes again
    todo = ranks.spread(sorted((g, missing) for part in ranks.gather(checked)
                               for g, missing in part.items() if missing))
    for cid, why in store.redone.items():
        print(f"cao2: class {cid} will be redone: {why}", file=sys.stderr)
    # under torchrun only rank 0 draws its bars (its share stands for every rank's: the groups are dealt in turn)
    shown = cfg.progress and ranks.is_main
    of_ranks = f" (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else ""
    sample_bar = tqdm(total=sum(source.size(space.ids[p]) for g, _ in todo for p in groups[g]),
                      desc=("encode" if cfg.images else "sample pool") + of_ranks, unit="img", disable=not shown)
    clo_bar = tqdm(total=sum(workplan.chunks(sum(source.keep(space.ids[p]) for p in groups[g]), cfg.batch_size)
                             for g, _ in todo) * cfg.clo_iters, desc="CLO" + of_ranks, unit="it", disable=not shown)
    for g, missing in todo:
        group = groups[g]
        cids, labels = [space.ids[p] for p in group], [space.generator_labels[p] for p in group]
        times = {}
        # 1. pool: sampled by the generator, each sample from its own seed (refine: the given images, encoded)
        t0 = time.perf_counter()
        pools = source.latents(list(zip(cids, labels)), cfg.batch_size, sample_bar)
        times["sample"] = time.perf_counter() - t0

        # 2. OSS per class: classify the decoded pool with the classifier's own preprocessing
        t0 = time.perf_counter()
        if cfg.select in ("confidence", "stability"):
            probs = classify(gen, handle, classifier, [p for p, _ in pools], cfg.batch_size)
            if cfg.select == "stability":
                probs_before = classify(gen, handle, classifier, [b for _, b in pools], cfg.batch_size)
        kept = []
        for k, (pos, cid, label) in enumerate(zip(group, cids, labels)):
            ipc = source.keep(cid)
            if cfg.select == "confidence":
                keep = select.select_confidence(probs[k], targets[pos], ipc, cfg.order)
                scores = select.scores_of(probs[k], targets[pos])[keep]
            elif cfg.select == "stability":
                keep = select.select_stability(probs_before[k], probs[k], ipc)
                scores = select.stability_of(probs_before[k], probs[k])[keep]
            else:
                keep = (select.select_random(source.size(cid), ipc, unit_generator(cfg.seed, label, 0, "select"))
                        if cfg.select == "random" else torch.arange(ipc))
                scores = torch.full((ipc,), float("nan"))
            kept.append((keep, scores))
        latents_init = torch.cat([pool[keep.to(pool.device)] for (pool, _), (keep, _) in zip(pools, kept)])
        times["select"] = time.perf_counter() - t0

        # 3. CLO: the group's selected latents in chunks, each with its own condition, noise and level draws
        t0 = time.perf_counter()
        if clo_bar.n == 0:
            clo_bar.reset(clo_bar.total)       # its clock starts with the first CLO, not with the first pool
        rows = [(cid, label, i) for cid, label, (keep, _) in zip(cids, labels, kept) for i in range(len(keep))]
        latents, bad = [], {}
        for idx in batches(range(len(rows)), cfg.batch_size):
            units = [rows[r] for r in idx]
            z, chunk_bad = clo.optimize_rows(
                gen, handle, latents_init[idx], torch.tensor([l for _, l, _ in units], device=device),
                [conditions[c] for c, _, _ in units], [unit_generator(cfg.seed, l, i, "clo-noise") for _, l, i in units],
                [unit_generator(cfg.seed, l, i, "clo-level") for _, l, i in units], clo_settings, clo_bar.update)
            latents.append(z)
            for r, it in chunk_bad.items():
                c, _, i = units[r]
                bad.setdefault(c, {})[i] = it
        latents = torch.cat(latents)
        times["clo"] = time.perf_counter() - t0

        # 4. decode the group in chunks; store each class, which appears only once all its files are in place
        t0 = time.perf_counter()
        pixels = in_chunks(lambda z: gen.decode(handle=handle, latents=z).cpu(), latents, cfg.batch_size)
        times["decode"] = time.perf_counter() - t0
        record_times = {k: round(v, 3) for k, v in times.items()}
        first = 0
        for pos, cid, label, (keep, scores) in zip(group, cids, labels, kept):
            ipc, rows_of = len(keep), slice(first, first + len(keep))
            first += ipc
            if pos not in missing:
                continue            # computed again only because its group had an incomplete class
            if cid in bad:
                reason = str(clo.NonFiniteLatents.first_of(bad[cid]))
                store.set_status(cid, {"status": "failed", "reason": reason, "label": pos, "generator_label": label})
                continue
            tensors = {"latents": latents[rows_of], "latents_init": latents_init[rows_of],
                       "labels": torch.full((ipc,), label), "scores": scores.float(), "pool_index": keep.long()}
            try:
                store.write_class(cid, pixels[rows_of], tensors, {
                    "name": space.names[pos], "label": pos, "generator_label": label, "condition": conditions[cid],
                    "pool": source.size(cid), "kept": ipc, "group": cids, "seconds": record_times,
                    "rank": ranks.rank})
            except OSError as exc:
                raise UserError(f"cannot write class {cid} into {cfg.out} ({exc.strerror or exc}); free disk space "
                                "or fix permissions, then rerun the same command to continue") from None
    sample_bar.close()
    clo_bar.close()

    # every rank's classes are written after this; the ranks send each other their new records
    sent = ranks.gather(store.this_run)
    written = sum(e["status"] == "complete" for entries in sent for e in entries.values())
    if ranks.is_main:
        store.finish(sent)              # the manifest lists every rank's records
    else:
        store.collect(sent)
    failed = {c: e.get("reason", "") for c, e in store.manifest["classes"].items() if e.get("status") == "failed"}
    completed = [c for c in space.ids if store.recorded_complete(c)]
    if ranks.is_main:
        write_preview(store, gen, handle, completed, device, cfg.batch_size)
    ranks.barrier()
    return RunResult(Path(cfg.out), completed, written, failed, ranks.rank)


def classify(gen: Generator, handle, classifier: Classifier, pools: list[torch.Tensor], batch_size: int
             ) -> list[torch.Tensor]:
    """Classifier probabilities of each pool's decoded latents; the pools share chunks of --batch-size, so no
    decode sees more."""
    probs = in_chunks(lambda z: classifier.probs(gen.decode(handle=handle, latents=z)).cpu(), torch.cat(pools),
                      batch_size)
    return list(probs.split([len(p) for p in pools]))


def write_preview(store: Store, gen: Generator, handle, class_ids: list[str], device, batch_size: int) -> None:
    """Selected latents before and after CLO, decoded side by side, for the first classes."""
    rows = []
    for cid in class_ids[:PREVIEW_CLASSES]:
        t = store.load_latents(cid)
        n = min(PREVIEW_IMAGES, len(t["latents"]))
        both = torch.cat([t["latents_init"][:n], t["latents"][:n]]).to(device)
        img = to_uint8(in_chunks(lambda z: gen.decode(handle=handle, latents=z), both, batch_size))
        rows.append((img[:n], img[n:]))
    if rows:
        store.write_preview(rows)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
    return dev


def resolve_classes(cfg: RunConfig, spec) -> LabelSpace:
    dataset = cfg.dataset or spec.label_space
    if dataset is None:
        raise UserError("this generator does not say which label space it uses; pass --dataset")
    space = label_space(dataset).select(cfg.classes)
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
    chosen = spec.reference_classifier_input if cfg.profile == "reference" else "timm"
    if chosen not in CLASSIFIER_INPUTS:
        raise UserError(f"generator {cfg.generator} declares reference_classifier_input={chosen!r}, which is not "
                        f"one of {', '.join(CLASSIFIER_INPUTS)}; pass --classifier-input or fix the plugin")
    return chosen


def condition_per_class(cfg: RunConfig, space: LabelSpace, classifier: Classifier | None) -> dict[str, str]:
    """The CLO condition of each class; ``auto`` = task-oriented: class label if the class is easy, else null."""
    if cfg.condition != "auto":
        return {cid: cfg.condition for cid in space.ids}
    if cfg.class_accuracy:
        try:
            acc = {str(k): float(v) for k, v in json.loads(Path(cfg.class_accuracy).read_text()).items()}
        except (OSError, ValueError, AttributeError):
            raise UserError(f"--class-accuracy {cfg.class_accuracy} is not a readable JSON object "
                            "{class id: accuracy}") from None
    else:
        acc = classifier.class_accuracy if classifier else {}
    missing = [c for c in space.ids if c not in acc]
    if missing:
        raise UserError(f"--condition auto needs the classifier's validation accuracy of class {missing[0]!r}; "
                        "pass --class-accuracy FILE or choose --condition class|null|zero")
    return {c: "class" if acc[c] >= cfg.condition_threshold else "null" for c in space.ids}


def run_id(cfg: RunConfig, source: dict | None = None) -> str:
    key = cfg.output_key() if source is None else {**cfg.output_key(), "source": source["sha256"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def manifest_header(cfg, gen: Generator, handle, space: LabelSpace, classifier, settings) -> dict:
    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None
    return {
        "config": {**cfg.output_key(), "clo_tmax": settings.level_max},
        "kernels": settings.kernels,
        "batch_size": cfg.batch_size,       # fixes which samples share a chunk; a resumed --batch-size auto reuses it
        "versions": {"cao2": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     **{p: ver(p) for p in ("diffusers", "timm", "safetensors", "pluggy")}},
        "command": " ".join(sys.argv),
        "generator": {"name": gen.name, **gen.describe(handle=handle)},
        "classifier": None if classifier is None else {"source": classifier.source, "sha256": classifier.sha256,
                                                       "input": classifier.input},
        "dataset": space.name,
        "class_ids": list(space.ids),
        "class_names": list(space.names),
        "generator_labels": list(space.generator_labels),
        "seeds": {"run_seed": cfg.seed, "unit_seed": "sha256('cao2/{seed}/{generator label}/{index}/{stream}')[:8]",
                  "streams": list(STREAMS)},
    }
