"""``cao2 report``: a finished run as one static HTML page, OUT/report/index.html.

    OUT/report/index.html              the page: CSS inline, no script, nothing fetched from the network
    OUT/report/before/<cid>/<i>.png    the kept latents decoded before CLO (small PNGs), beside the run's own
                                       images/<cid>/<i>.png (after CLO), which the page links by relative path
    OUT/report/pool/<cid>/<i>.png      pool sample i's thumbnail as the run recorded it (``pool_thumbs``)
    OUT/report/pool/<cid>.html         the class's pool panel, when the run holds too many thumbnails to show them
                                       all on the one page (``POOL_INLINE_MAX``)

The page says what was run (generator, its version and checkpoint hashes, dataset, IPC, profile, seed, versions,
classifier), indexes the classes, shows per class the images after CLO beside the same samples before CLO with the
judge's confidence under each, CLO's loss curves (an inline SVG) and the pool OSS chose from (every recorded
thumbnail with the judge's score, the kept ones in their order, the rejected ones marked with why), and the
evaluations found under OUT/eval. What a folder does not hold (an older run's loss curves or pool record, a pool
that was never classified) is said, never invented.
The folder is written into a staging folder beside it and renamed into place; a refused report writes nothing.
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..config import JUDGED_STRATEGIES
from ..errors import UserError, reason
from ..store.files import locked_folder, new_folder
from ..store.records import sweep_reports
from ..store.layout import EVAL_FOLDER, REPORT_FOLDER
from .export import RunImages, checkpoint_hashes, judge_classes, tolerant_report, open_run

PAGE = "index.html"
BEFORE = "before"
THUMB_MAX = 128             # the longest side of a before-CLO thumbnail, in pixels
POOL = "pool"
NOT_RECORDED = "not recorded"
POOL_KEYS = ("pool_score", "pool_pred", "pool_pred_prob", "pool_rank", "pool_reason", "pool_thumbs",
             "pool_thumb_index")
POOL_INLINE_MAX = 4000      # pool thumbnails of the whole run shown on the one page; beyond, a page per class
WRONG_CLASS = 1             # pool_reason's code (cao2core.method.oss.REASONS, also in each class's record)


@dataclass
class ReportResult:
    """What ``report`` wrote: the report folder, its page, the number of classes, of before-CLO thumbnails and of
    pool thumbnails, and what the run folder did not record (said on the page)."""

    out: Path
    page: Path
    classes: int
    thumbnails: int
    missing: list[str] = field(default_factory=list)
    pool_thumbnails: int = 0


def report(out: str | Path, device: str = "auto") -> ReportResult:
    """Write OUT/report/ for the finished run ``out``: the page and the before-CLO thumbnails, decoded with the
    run's generator on ``device``. A folder that is not a finished cao2 run is refused before anything is written."""
    run = open_run(out, "reporting on it")
    latents = _latents(run)
    target = run.root / REPORT_FOLDER
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder; move it away, then rerun `cao2 report {out}`")
    thumbs = _decode_before(run, latents, device) if any("latents_init" in t for t in latents.values()) else {}
    pools = _pool_pngs(run, latents)
    pool_pages = sum(len(p) for p in pools.values()) > POOL_INLINE_MAX
    try:
        sweep_reports(run.root)
        staging = new_folder(run.root, f".{REPORT_FOLDER}.")
    except OSError as exc:
        raise UserError(f"cannot write in {run.root} ({reason(exc)}); fix its permissions, then rerun") from None
    try:
        with locked_folder(staging):    # in use: neither a run's sweep nor another report removes it meanwhile
            count = 0
            for cid, pngs in thumbs.items():
                folder = staging / BEFORE / cid
                folder.mkdir(parents=True)
                for name, data in pngs.items():
                    (folder / name).write_bytes(data)
                    count += 1
            for cid, pngs in pools.items():
                folder = staging / POOL / cid
                folder.mkdir(parents=True)
                for name, data in pngs.items():
                    (folder / name).write_bytes(data)
            missing = []
            page = render(run, latents, thumbs, missing, pool_pages)
            (staging / PAGE).write_text(page, encoding="utf-8")
            if pool_pages:
                judge = _judge_names(run)
                for cid in pools:
                    (staging / POOL / f"{cid}.html").write_text(pool_page(run, cid, latents[cid], judge),
                                                                encoding="utf-8")
            old = None
            if target.exists():
                old = new_folder(run.root, f".{REPORT_FOLDER}.")
                os.replace(target, old / REPORT_FOLDER)
            os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write {target} ({reason(exc)}); free disk space or fix permissions, then rerun"
                        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ReportResult(target, target / PAGE, len(run.classes), count, missing,
                        sum(len(p) for p in pools.values()))


def _latents(run: RunImages) -> dict[str, dict]:
    """Per class the tensors of latents/<cid>.safetensors the page uses ({} where the file is missing)."""
    from safetensors import safe_open

    found = {}
    for cid in run.classes:
        path = run.root / "latents" / f"{cid}.safetensors"
        found[cid] = {}
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as fh:
                    for key in ("latents_init", "scores", "clo_loss_mean", "clo_loss_max", *POOL_KEYS):
                        if key in fh.keys():
                            found[cid][key] = fh.get_tensor(key)
            except Exception as exc:       # safetensors raises its own errors for a damaged file
                raise UserError(f"{path} is not readable ({exc}); rerun the same `cao2 run` to restore the class"
                                ) from None
    return found


def run_config(manifest: dict, device: str = "auto"):
    """The run's RunConfig rebuilt from the manifest's config (the options that shaped the output)."""
    from ..config import RunConfig

    names = {f.name for f in fields(RunConfig)}
    config = {k: v for k, v in (manifest.get("config") or {}).items() if k in names}
    return RunConfig(**{**config, "device": device})


def _decode_before(run: RunImages, latents: dict[str, dict], device: str) -> dict[str, dict[str, bytes]]:
    """PNG thumbnails of the kept latents before CLO, decoded with the run's generator in chunks of the run's
    batch size: {cid: {"<i>.png": bytes}}, image i beside the run's images/<cid>/<i>.png."""
    import numpy as np
    import torch
    from PIL import Image

    from ..environment import resolve_device
    from ..generators.host import Host
    from ..method.pools import in_chunks
    from ..store.images import png_bytes, to_uint8

    cfg = run_config(run.manifest, device)
    resolved = resolve_device(device)
    gen = Host().generator(cfg.generator)
    handle = gen.load(options=gen.parse_options(cfg.gen_options()), device=resolved)
    size = run.manifest.get("batch_size") or cfg.batch_size
    size = size if isinstance(size, int) and size > 0 else 8
    thumbs = {}
    for cid in run.classes:
        z0 = latents[cid].get("latents_init")
        if z0 is None:
            continue
        with torch.no_grad():
            pixels = in_chunks(lambda z: gen.decode(handle=handle, latents=z.to(resolved)).float().cpu(), z0, size)
        arrays = to_uint8(pixels)
        pngs = {}
        for path, arr in zip(run.images[cid], arrays):
            if max(arr.shape[:2]) > THUMB_MAX:
                image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
                image.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
                arr = np.asarray(image)
                arr = arr[..., None] if arr.ndim == 2 else arr
            pngs[path.name] = png_bytes(arr)
        thumbs[cid] = pngs
    return thumbs


def _pool_pngs(run: RunImages, latents: dict[str, dict]) -> dict[str, dict[str, bytes]]:
    """PNGs of the pool thumbnails the run recorded: {cid: {"<pool index>.png": bytes}} (classes whose pool the
    page cannot show are left out)."""
    from ..store.images import png_bytes

    found = {}
    for cid, t in latents.items():
        if _pool_missing(run, cid, t) is None:
            found[cid] = {f"{i}.png": png_bytes(arr.numpy())
                          for i, arr in zip(t["pool_thumb_index"].tolist(), t["pool_thumbs"])}
    return found


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return NOT_RECORDED
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def loss_svg(mean: list[float], peak: list[float], width: int = 360, height: int = 120) -> str:
    """CLO's loss per iteration as an inline SVG: the mean term and the max term, each averaged over samples."""
    curves = {k: [v for v in c if math.isfinite(v)] for k, c in (("mean", mean), ("max", peak))}
    values = [v for c in curves.values() for v in c]
    if not values:
        return f"<p class=note>CLO loss curves: {NOT_RECORDED} (no finite values)</p>"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    pad = 6

    def points(c: list[float]) -> str:
        n = max(1, len(c) - 1)
        return " ".join(f"{pad + (width - 2 * pad) * i / n:.1f},{pad + (height - 2 * pad) * (high - v) / span:.1f}"
                        for i, v in enumerate(c))
    lines = "".join(f'<polyline class="{k}" fill="none" stroke-width="1.5" points="{points(c)}"/>'
                    for k, c in curves.items() if c)
    return (f'<svg class=loss width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="CLO loss per iteration">{lines}</svg>'
            f'<p class=legend><span class=kmean>&#9644; mean term</span> <span class=kmax>&#9644; max term</span>, '
            f'averaged over the class\'s samples, {len(curves["mean"] or curves["max"])} iterations; '
            f'from {_num(high, 4)} (top) to {_num(low, 4)} (bottom)</p>')


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;
vertical-align:top}th{background:#f3f3f3}code{font-size:.9em}
.note{color:#8a4b00}.pair{display:flex;gap:2em;flex-wrap:wrap}.panel h4{margin:.3em 0}
.grid{display:flex;flex-wrap:wrap;gap:6px}.cell{text-align:center;font-size:.8em}
.cell img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;display:block;background:#eee}
svg.loss{background:#fafafa;border:1px solid #ddd}polyline.mean,.kmean{stroke:#1f77b4;color:#1f77b4}
polyline.max,.kmax{stroke:#d62728;color:#d62728}.legend{font-size:.85em}
nav ul{columns:4;list-style:none;padding:0}
.pool .cell{width:100px}.pool .cell img{width:64px;height:64px;margin:0 auto 2px}.pool .cell span{display:block}
.kept img,.swatch.kept{outline:3px solid #2ca02c}.wrong img,.swatch.wrong{outline:3px solid #d62728}
.out img,.swatch.out{outline:3px dashed #999}.out img{opacity:.5}.mark{font-weight:600}
.kept .mark{color:#2ca02c}.wrong .mark{color:#d62728}.out .mark{color:#777}.says{color:#d62728}
.swatch{display:inline-block;width:.9em;height:.9em;margin:0 .3em 0 .8em;vertical-align:middle}
.nothumb{width:64px;height:64px;margin:0 auto 2px;background:#eee;font-size:.7em;color:#777}
"""


def render(run: RunImages, latents: dict[str, dict], thumbs: dict[str, dict[str, bytes]], missing: list[str],
           pool_pages: bool = False) -> str:
    """The page (``missing`` receives what the folder did not record); ``pool_pages``: each class's pool panel is
    a page of its own (``pool_page``), linked from its section."""
    m = run.manifest
    gen = m.get("generator") or {}
    config = m.get("config") or {}
    names = dict(zip(run.classes, m.get("class_names") or run.classes))
    count = sum(len(v) for v in run.images.values())
    ipc = config.get("ipc", count // max(1, len(run.classes)))
    title = f"cao2 run {m.get('run_id', '')}: {m.get('dataset', '?')}, IPC {ipc}"
    clf = m.get("classifier")
    setup = [["generator", f"{gen.get('name', NOT_RECORDED)} {gen.get('version', '')} "
                           f"({gen.get('distribution', '')})"],
             ["dataset", m.get("dataset", NOT_RECORDED)], ["IPC", ipc],
             ["profile", config.get("profile", NOT_RECORDED)],
             ["seed", (m.get("seeds") or {}).get("run_seed", config.get("seed", NOT_RECORDED))],
             ["classes", len(run.classes)], ["images", count],
             ["classifier (judge)", NOT_RECORDED if not clf else f"{clf.get('source')} ({clf.get('input', '')})"]]
    hashes = {**checkpoint_hashes(gen, "generator."), **checkpoint_hashes(clf or {}, "classifier.")}
    versions = m.get("versions") or {}
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
             f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             "<p>CaO2: OSS kept the judge's most confident samples of a generated pool, CLO optimized their latents. "
             "Each class shows the kept images after CLO (the set as written) beside the same samples before CLO, "
             "with the judge's confidence at selection under each, and the pool OSS chose from.</p>",
             "<h2 id=run>What was run</h2>", _table(["", ""], [[k, v] for k, v in setup]),
             "<h3 id=hashes>Checkpoints (sha256)</h3>",
             _table(["file", "sha256"], [[k, v] for k, v in sorted(hashes.items())]) if hashes
             else f"<p class=note>{NOT_RECORDED}</p>",
             "<h3 id=settings>Settings</h3>",
             _table(["option", "value"], [[k, json.dumps(v)] for k, v in config.items()]),
             "<h3 id=versions>Versions</h3>",
             _table(["package", "version"], [[k, v] for k, v in versions.items()]) if versions
             else f"<p class=note>{NOT_RECORDED}</p>",
             "<h2 id=evaluation>Evaluation</h2>", _evaluations(run.root),
             "<h2 id=classes>Classes</h2>", POOL_LEGEND, "<nav><ul>",
             *[f'<li><a href="#class-{_e(cid)}">{_e(cid)} {_e(names[cid])}</a></li>' for cid in run.classes],
             "</ul></nav>"]
    judge = _judge_names(run)
    for cid in run.classes:
        parts.append(_class_section(run, cid, names[cid], latents[cid], thumbs.get(cid), missing, pool_pages, judge))
    parts.append(f"<footer><p>Written by <code>cao2 report</code> from {_e(run.root.name)}/manifest.json and the "
                 "run's latents; rerun it after a resume or a new evaluation.</p></footer></body></html>\n")
    return "\n".join(parts)


def _class_section(run: RunImages, cid: str, name: str, t: dict, thumbs: dict | None, missing: list[str],
                   pool_pages: bool = False, judge: dict[int, str] | None = None) -> str:
    scores = t["scores"].tolist() if "scores" in t else None
    if scores is None:
        missing.append(f"{cid}: scores")
    out = [f'<section id="class-{_e(cid)}"><h3>{_e(cid)} {_e(name)}</h3><div class=pair>']
    after, before = [], []
    for i, path in enumerate(run.images[cid]):
        conf = f"confidence {_num(scores[i])}" if scores is not None and i < len(scores) else \
            f"confidence {NOT_RECORDED}"
        alt = f"{name} {path.stem}"
        after.append(f'<div class=cell><img loading="lazy" src="../images/{_e(cid)}/{_e(path.name)}" '
                     f'alt="{_e(alt)} after CLO"><span>{_e(conf)}</span></div>')
        if thumbs is not None and path.name in thumbs:
            before.append(f'<div class=cell><img loading="lazy" src="{BEFORE}/{_e(cid)}/{_e(path.name)}" '
                          f'alt="{_e(alt)} before CLO"><span>{_e(conf)}</span></div>')
    out.append(f"<div class=panel><h4>after CLO</h4><div class=grid>{''.join(after)}</div></div>")
    if before:
        out.append(f"<div class=panel><h4>before CLO</h4><div class=grid>{''.join(before)}</div></div>")
    else:
        missing.append(f"{cid}: latents before CLO")
        out.append(f"<div class=panel><h4>before CLO</h4><p class=note>{NOT_RECORDED}: this folder has no "
                   "latents_init for the class</p></div>")
    out.append("</div>")
    if "clo_loss_mean" in t and "clo_loss_max" in t and t["clo_loss_mean"].numel():
        mean = t["clo_loss_mean"].double().reshape(len(t["clo_loss_mean"]), -1).mean(0).tolist()
        peak = t["clo_loss_max"].double().reshape(len(t["clo_loss_max"]), -1).mean(0).tolist()
        out.append("<h4>CLO loss</h4>" + loss_svg(mean, peak))
    else:
        missing.append(f"{cid}: clo_loss curves")
        out.append(f"<h4>CLO loss</h4><p class=note>{NOT_RECORDED}: this run folder has no clo_loss curves "
                   "(written by cao2 versions that record them)</p>")
    out.append(_pool_section(run, cid, t, missing, pool_pages, _judge_names(run) if judge is None else judge))
    out.append("</section>")
    return "".join(out)


def _pool_problem(t: dict) -> str | None:
    """Why the pool tensors of a class's latents file are not those cao2 writes (None: they are)."""
    size = t["pool_score"].shape
    if len(size) != 1 or any(t[k].shape != size for k in ("pool_pred", "pool_pred_prob", "pool_rank",
                                                          "pool_reason")):
        return "its per-sample pool fields differ in length"
    thumbs, index = t["pool_thumbs"], t["pool_thumb_index"]
    if (str(thumbs.dtype) != "torch.uint8" or thumbs.dim() != 4 or thumbs.shape[-1] not in (1, 3)
            or index.shape != thumbs.shape[:1] or (index.numel() and not 0 <= int(index.min()) <= int(index.max())
                                                   < size[0])):
        return "its pool thumbnails are not uint8 images of its pool's samples"
    return None


def _pool_missing(run: RunImages, cid: str, t: dict) -> str | None:
    """Why the page cannot show the class's pool (None: it can), in words for the page."""
    config = run.manifest.get("config") or {}
    select = config.get("select", "confidence")
    record = ((run.manifest.get("classes") or {}).get(cid) or {}).get("pool_record")
    if select not in JUDGED_STRATEGIES:
        command = "cao2 refine" if config.get("images") else "cao2 run"
        return (f"{command} with --select {select} classifies nothing, so no judge's answer on the pool was "
                "recorded")
    if not isinstance(record, dict) or not all(k in t for k in POOL_KEYS):
        return ("this run folder was written by a cao2 version that did not record the pool (rerun `cao2 run` "
                "into a new --out to see it)")
    problem = _pool_problem(t)
    return f"latents/{cid}.safetensors is damaged: {problem}" if problem else None


def _judge_names(run: RunImages) -> dict[int, str]:
    """The judge's output index -> the run's class at that index (the targets the records hold)."""
    names = dict(zip(run.classes, run.manifest.get("class_names") or run.classes))
    return {target: f"{cid} {names[cid]}" if names[cid] != cid else cid
            for target, cid in judge_classes(run).items() if cid in names}


POOL_LEGEND = ("<p class=legend><span class='swatch kept'></span> kept (#: selection order) "
               "<span class='swatch wrong'></span> rejected: wrong class (the judge's top class is another) "
               "<span class='swatch out'></span> rejected: not in the kept quantile (ranked out by its score; with "
               "--select stability every rejection, as stability does not check the class). Under each "
               "sample: the score OSS ranked by (confidence: the judge's probability of the class; stability: the "
               "agreement of its answers one sampler step apart); where the judge's top class is another, its "
               "name and probability.</p>")


def _pool_panel(run: RunImages, cid: str, t: dict, base: str, judge: dict[int, str]) -> str:
    """Every pool sample in pool order: its thumbnail (from ``base``) or a note where the budget left it out,
    its score, and kept (with its order) or why not; ``judge`` names the judge's classes (``_judge_names``)."""
    record = run.manifest["classes"][cid]["pool_record"]
    target, select = record.get("target"), record.get("select", "confidence")
    shown = set(t["pool_thumb_index"].tolist())
    cells = []
    rows = zip(t["pool_score"].tolist(), t["pool_pred"].tolist(), t["pool_pred_prob"].tolist(),
               t["pool_rank"].tolist(), t["pool_reason"].tolist())
    for i, (score, pred, prob, rank, reason) in enumerate(rows):
        kind = "kept" if rank >= 0 else "wrong" if reason == WRONG_CLASS else "out"
        why = {"kept": f"kept #{rank + 1}", "wrong": "\u2717 wrong class", "out": "\u2717 not in the kept quantile"}
        mark = {**why, "out": "\u2717 ranked out"}[kind]      # short under the image; the title says it whole
        says = (f"<span class=says>judge: {_e(judge.get(pred, f'output {pred}'))} {_num(prob, 2)}</span>"
                if pred != target else "")
        label = f"{'p' if select == 'confidence' else 'stab.'} {_num(score)}"
        alt = f"pool sample {i}: {label}, {why[kind]}"
        picture = (f'<img loading="lazy" src="{_e(base)}{i}.png" alt="{_e(alt)}">' if i in shown else
                   "<div class=nothumb>thumbnail not stored (budget)</div>")
        cells.append(f'<div class="cell {kind}" title="{_e(alt)}">{picture}<span>{i}: {_e(label)}</span>'
                     f"<span class=mark>{_e(mark)}</span>{says}</div>")
    return f"<div class='grid pool'>{''.join(cells)}</div>"


def _pool_summary(run: RunImages, cid: str, t: dict) -> str:
    record = run.manifest["classes"][cid]["pool_record"]
    reasons = t["pool_reason"].tolist()
    kept = sum(r >= 0 for r in t["pool_rank"].tolist())
    wrong = sum(r == WRONG_CLASS for r, k in zip(reasons, t["pool_rank"].tolist()) if k < 0)
    size, stored = len(reasons), len(t["pool_thumb_index"])
    capped = (f"; thumbnails of {stored} of them stored (the budget: the kept ones first, then pool order)"
              if stored < size else "")
    return (f"<p>--select {_e(record.get('select'))}: a pool of {size}, {kept} kept, {wrong} rejected as the wrong "
            f"class, {size - kept - wrong} not in the kept quantile{capped}.</p>")


def _pool_section(run: RunImages, cid: str, t: dict, missing: list[str], pool_pages: bool,
                  judge: dict[int, str]) -> str:
    why = _pool_missing(run, cid, t)
    if why:
        missing.append(f"{cid}: pool record")
        return f"<h4>Pool</h4><p class=note>The pool OSS chose from: {NOT_RECORDED}: {_e(why)}.</p>"
    head = "<h4>Pool</h4>" + _pool_summary(run, cid, t)
    if pool_pages:
        return head + f'<p><a href="{POOL}/{_e(cid)}.html">the pool, sample by sample</a></p>'
    return head + _pool_panel(run, cid, t, f"{POOL}/{cid}/", judge)


def pool_page(run: RunImages, cid: str, t: dict, judge: dict[int, str]) -> str:
    """A class's pool panel as a page of its own, beside its thumbnails (report/pool/<cid>.html)."""
    names = dict(zip(run.classes, run.manifest.get("class_names") or run.classes))
    title = f"pool of {cid} {names.get(cid, '')}"
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=viewport content='width=device-width'><style>{CSS}</style></head><body>"
            f"<p><a href='../{PAGE}#class-{_e(cid)}'>back to the report</a></p><h1>{_e(title)}</h1>"
            f"{_pool_summary(run, cid, t)}{POOL_LEGEND}{_pool_panel(run, cid, t, f'{cid}/', judge)}"
            "</body></html>\n")


def _evaluations(root: Path) -> str:
    parts = []
    path = root / EVAL_FOLDER / "eval.json"
    if path.is_file():
        with tolerant_report(path) as data:
            s, settings = data["summary"], data["config"]["settings"]
            rows = [[key, s[key].get("what", ""), _num(s[key]["mean"], 2), _num(s[key]["std"], 2)]
                    for key in ("headline", "final_acc", "best_epoch_acc") if key in s]
            parts.append(f"<h3>cao2 eval (eval/eval.json), protocol {_e(settings.get('protocol'))}, "
                         f"{_e(s.get('repeats'))} students</h3>"
                         + _table(["accuracy", "what", "mean %", "std"], rows))
        if not parts:
            parts.append("<p class=note>eval/eval.json is not readable as a cao2 eval report</p>")
    path = root / EVAL_FOLDER / "compare" / "compare.json"
    if path.is_file():
        with tolerant_report(path) as data:
            rows = data["protocols"]
            ranked = any("ddrs" in r for r in rows)
            header = ["protocol", "distilled %", "random real %", "difference"] + (["IOR", "HLR", "DDRS"] if ranked
                                                                                   else [])
            body = [[r["protocol"], _num(r["distilled"]["mean"], 2), _num(r["random_real"]["mean"], 2),
                     f"{r['difference']:+.2f}"] + ([_num(r.get("ior"), 2), _num(r.get("hlr"), 2),
                                                    _num(r.get("ddrs"), 3)] if ranked else []) for r in rows]
            parts.append("<h3>cao2 compare (eval/compare/compare.json)</h3>" + _table(header, body)
                         + ("" if ranked else f"<p class=note>DD-Ranking's IOR, HLR, DDRS: {NOT_RECORDED} "
                            "(compare without a full-data accuracy)</p>"))
    if not parts:
        parts.append(f"<p class=note>No evaluation was found under {EVAL_FOLDER}/ (run <code>cao2 eval</code> or "
                     "<code>cao2 compare</code>, then rerun <code>cao2 report</code>).</p>")
    return "\n".join(parts)
