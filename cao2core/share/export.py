"""``cao2 export``: a finished run in the layouts the field's tools read.

    hf       DIR/train/<class id>/<i>.png, DIR/train/metadata.jsonl (label, class id and name, the judge's
             confidence, the run seed and pool index of each image), DIR/README.md (a dataset card with the YAML
             header the Hub reads); ``datasets.load_dataset("imagefolder", data_dir=DIR)`` loads it offline.
    rded     DIR/00000/<i>.png ... (RDED's numeric class folders, numbered by the class's label in the run's label
             space) and DIR/class_map.txt, the ``FOLDER CLASS_ID`` lines ``cao2 eval --class-map`` reads.
    tensors  DIR/images.pt (float32, N x C x H x W in [0, 1], not normalized) and DIR/labels.pt (int64, N: the
             label in the run's label space), the pair DD-Ranking's ``compute_metrics(image_tensor=...)`` takes;
             DIR/classes.txt names the label of each position. Plain tensors: ``torch.load(..., weights_only=True)``.

The whole export is written into a staging folder beside DIR and renamed into place, so a refused or failed export
leaves nothing; DIR must not exist or be empty, and must not lie inside the run folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, reason
from ..store.identity import file_hashes
from ..store.layout import EVAL_FOLDER, MANIFEST

FORMATS = ("hf", "rded", "tensors")
CLASS_MAP = "class_map.txt"
SPLIT = "train"
# the licence of the weights a generator family is published under, where cao2 knows it (Hub licence ids)
MODEL_LICENCES = {"dit": ("cc-by-nc-4.0", "DiT-XL/2 weights (facebookresearch/DiT): CC BY-NC 4.0"),
                  "mar": ("mit", "MAR weights (LTH14/mar): MIT"),
                  "sd": ("creativeml-openrail-m", "Stable Diffusion 1.x weights: CreativeML OpenRAIL-M")}
EMBEDDED = ("mit", "the embedded MNIST world shipped with cao2: MIT, as cao2")


@dataclass
class ExportResult:
    """What ``export`` wrote: the folder, its format, the number of images and the files other than images."""

    out: Path
    format: str
    images: int
    files: list[Path]
    pushed: str | None = None       # the Hub repository it was uploaded to


@dataclass
class RunImages:
    """A finished run as ``export`` reads it: the manifest, and per class its images and latents' tensors."""

    root: Path
    manifest: dict
    classes: list[str]
    images: dict[str, list[Path]]
    tensors: dict[str, dict]        # scores and pool_index per class (None where the latents file lacks them)


def open_run(data: str | Path, action: str = "exporting it") -> RunImages:
    """The complete classes of the cao2 run folder ``data``; refuses a folder that is not one, or an unfinished
    run (export shares finished sets only)."""
    from safetensors import safe_open

    root = Path(data)
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{root} is not a finished cao2 run (no readable {MANIFEST}); give the --out of `cao2 run`"
                        ) from None
    entries = manifest.get("classes") or {}
    ids = manifest.get("class_ids") or []
    missing = [c for c in ids if (entries.get(c) or {}).get("status") != "complete"]
    if not ids or missing:
        raise UserError(f"{root}: class {missing[0] if missing else '?'} is not complete; finish the run (rerun "
                        "the same `cao2 run`) before " + action)
    images, tensors = {}, {}
    for cid in ids:
        names = sorted(entries[cid]["files"]["images"], key=lambda n: int(n.split(".")[0]))
        images[cid] = [root / "images" / cid / n for n in names]
        lost = [p for p in images[cid] if not p.is_file()]
        if lost:
            raise UserError(f"{lost[0]} is missing; rerun the same `cao2 run` to restore the class, then export")
        found = {}
        latents = root / "latents" / f"{cid}.safetensors"
        if latents.is_file():
            with safe_open(str(latents), "pt") as fh:
                for key in ("scores", "pool_index", "pool_pred", "pool_pred_prob"):
                    if key in fh.keys():
                        found[key] = fh.get_tensor(key).tolist()
        tensors[cid] = found
    return RunImages(root, manifest, list(ids), images, tensors)


def _check_target(run: RunImages, to: str | Path, fmt: str) -> Path:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not to:
        raise UserError("cao2 export needs --to DIR: an empty or new folder outside the run")
    target = Path(to).absolute()
    run_root = run.root.resolve()
    resolved = target.resolve()
    if resolved == run_root or run_root in resolved.parents:
        raise UserError(f"--to {to} is inside the run folder {run.root}; export to a folder outside it")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--to {to} exists and is not an empty folder; choose a new folder")
    return target


def export(data: str | Path, fmt: str, to: str | Path, push: str | None = None, token: str | None = None
           ) -> ExportResult:
    """Write the finished run ``data`` into ``to`` in format ``fmt`` (hf, rded or tensors); with ``push`` (a Hub
    repository id, hf only) upload the folder with huggingface_hub, using ``token`` or the login's."""
    run = open_run(data)
    target = _check_target(run, to, fmt)
    if push and fmt != "hf":
        raise UserError(f"--push uploads a Hugging Face dataset; use --format hf (got --format {fmt})")
    if push:
        _check_hub_login(token)
    writer = {"hf": _write_hf, "rded": _write_rded, "tensors": _write_tensors}[fmt]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())         # a shared set gets the mode the umask gives, as a run does
        files = writer(run, staging)
        if target.exists():
            target.rmdir()          # empty, checked above
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    count = sum(len(v) for v in run.images.values())
    result = ExportResult(target, fmt, count, [target / f.relative_to(staging) for f in files])
    if push:
        result.pushed = _push(target, push, token)
    return result


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_images(run: RunImages, folder_of) -> None:
    for cid in run.classes:
        folder = folder_of(cid)
        folder.mkdir(parents=True, exist_ok=True)
        for path in run.images[cid]:
            shutil.copyfile(path, folder / path.name)


def _label(run: RunImages, cid: str) -> int:
    """The class's label in the run's label space (its position in the dataset's class list)."""
    return int(run.manifest["classes"][cid].get("label", run.classes.index(cid)))


def _write_rded(run: RunImages, out: Path) -> list[Path]:
    folder = {cid: f"{_label(run, cid):05d}" for cid in run.classes}
    _copy_images(run, lambda cid: out / folder[cid])
    (out / CLASS_MAP).write_text("# RDED folder -> class id (cao2 eval --class-map)\n"
                                 + "".join(f"{folder[c]} {c}\n" for c in run.classes))
    return [out / CLASS_MAP]


def _write_tensors(run: RunImages, out: Path) -> list[Path]:
    import numpy as np
    import torch
    from PIL import Image

    images, labels = [], []
    for cid in run.classes:
        for path in run.images[cid]:
            with Image.open(path) as image:
                array = np.asarray(image)
            array = array[..., None] if array.ndim == 2 else array
            images.append(torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255)
            labels.append(_label(run, cid))
    torch.save(torch.stack(images), out / "images.pt")
    torch.save(torch.tensor(labels, dtype=torch.long), out / "labels.pt")
    names = run.manifest.get("class_names") or run.classes
    (out / "classes.txt").write_text("".join(f"{_label(run, c)} {c} {n}\n" for c, n in zip(run.classes, names)))
    return [out / "images.pt", out / "labels.pt", out / "classes.txt"]


def _write_hf(run: RunImages, out: Path) -> list[Path]:
    split = out / SPLIT
    _copy_images(run, lambda cid: split / cid)
    names = dict(zip(run.classes, run.manifest.get("class_names") or run.classes))
    seed = (run.manifest.get("seeds") or {}).get("run_seed")
    judge_class_ids = judge_classes(run)
    rows = []
    for position, cid in enumerate(run.classes):
        found = run.tensors[cid]
        for i, path in enumerate(run.images[cid]):
            scores, pool = found.get("scores"), found.get("pool_index")
            confidence = scores[i] if scores is not None and i < len(scores) else None
            index = pool[i] if pool is not None and i < len(pool) else None
            top, top_prob = _judge_answer(found, index)
            rows.append({"file_name": f"{cid}/{path.name}", "label": position, "class_id": cid,
                         "class_name": names[cid], "dataset_label": _label(run, cid),
                         # NaN (a selection without scores) is not JSON; null says "not measured"
                         "confidence": confidence if confidence == confidence else None,
                         "judge_class": None if top is None else judge_class_ids.get(top, f"output {top}"),
                         "judge_probability": top_prob, "seed": seed, "pool_index": index})
    (split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "README.md").write_text(dataset_card(run))
    return [split / "metadata.jsonl", out / "README.md"]


def judge_classes(run: RunImages) -> dict[int, str]:
    """The judge's output index -> the run's class id at that index (the targets the pool records hold)."""
    found = {}
    for cid, entry in (run.manifest.get("classes") or {}).items():
        target = ((entry or {}).get("pool_record") or {}).get("target")
        if isinstance(target, int):
            found[target] = cid
    return found


def _judge_answer(found: dict, index: int | None) -> tuple[int | None, float | None]:
    """The judge's top output and its probability for pool sample ``index``, from the class's pool record
    (None, None: not recorded, as for --select random or a folder from an older cao2)."""
    preds, probs = found.get("pool_pred"), found.get("pool_pred_prob")
    if preds is None or probs is None or index is None or not 0 <= index < min(len(preds), len(probs)):
        return None, None
    return int(preds[index]), float(probs[index])


def _licence(manifest: dict) -> tuple[str, str]:
    gen = manifest.get("generator") or {}
    sources = [v.get("source", "") for v in gen.values() if isinstance(v, dict)]
    if any("/worlds/" in str(s).replace(os.sep, "/") for s in sources):
        return EMBEDDED
    unknown = ("other", "unknown: check the terms of the generator's weights")
    if gen.get("name") == "dit" and not any("dit-xl" in str(s).lower() for s in sources):
        return unknown      # a DiT of someone else's training: DiT-XL/2's licence says nothing about it
    return MODEL_LICENCES.get(gen.get("name"), unknown)


def checkpoint_hashes(record, prefix: str = "") -> dict[str, str]:
    """The sha256 strings of a manifest entry by dotted path, for a card or a page."""
    return {k: v for k, v in file_hashes(record, prefix).items() if isinstance(v, str)}


def evaluations(root: Path) -> list[tuple[str, str, str]]:
    """The scores a run folder holds: (what, protocol, figure) from eval/eval.json and eval/compare/compare.json."""
    found = []
    report = root / EVAL_FOLDER / "eval.json"
    if report.is_file():
        with tolerant_report(report) as data:
            h = data["summary"]["headline"]
            found.append(("cao2 eval (distilled)", data["config"]["settings"]["protocol"],
                          f"{h['mean']:.2f} ± {h['std']:.2f}"))
    report = root / EVAL_FOLDER / "compare" / "compare.json"
    if report.is_file():
        with tolerant_report(report) as data:
            for row in data["protocols"]:
                figure = (f"{row['distilled']['mean']:.2f} (random real {row['random_real']['mean']:.2f}, "
                          f"difference {row['difference']:+.2f}")
                if "ddrs" in row:
                    figure += f", HLR {row['hlr']:+.2f}, DDRS {row['ddrs']:.3f}"
                found.append(("cao2 compare", row["protocol"], figure + ")"))
    return found


class tolerant_report:
    """A JSON report, or an empty dict when it is damaged: a card or a page shows what it can read."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def __exit__(self, kind, value, tb) -> bool:
        return kind in (KeyError, TypeError)      # a report of another shape: left out


def _yaml(value) -> str:
    return json.dumps(value)        # a JSON scalar or list is valid YAML


def dataset_card(run: RunImages) -> str:
    """README.md of the hf export: the YAML header the Hub reads, then what made the set and how it scores."""
    m = run.manifest
    licence, licence_text = _licence(m)
    count = sum(len(v) for v in run.images.values())
    ipc = count // max(1, len(run.classes))
    gen = m.get("generator") or {}
    config = m.get("config") or {}
    title = f"CaO2-distilled {m.get('dataset', '?')}, IPC {ipc}"
    header = ["---", f"license: {licence}", f"pretty_name: {_yaml(title)}", "task_categories:",
              "- image-classification", "tags:", "- dataset-distillation", "- cao2", "- synthetic",
              "size_categories:", f"- {'n<1K' if count < 1000 else '1K<n<10K' if count < 10000 else '10K<n<100K'}",
              "configs:", "- config_name: default", "  data_files:", f"  - split: {SPLIT}",
              f"    path: {_yaml(SPLIT + '/**')}", "---", ""]
    hashes = {**checkpoint_hashes(gen, "generator."), **checkpoint_hashes(m.get("classifier") or {}, "classifier.")}
    lines = [f"# {title}", "",
             f"{count} images, {len(run.classes)} classes of `{m.get('dataset')}`, distilled by "
             f"[cao2](https://arxiv.org/abs/2506.22637) (CaO2: OSS selects the judge's most confident samples of a "
             f"generated pool, CLO optimizes their latents). Run `{m.get('run_id')}`.", "",
             "## Generator", "",
             f"- `{gen.get('name')}` {gen.get('version', '')} ({gen.get('distribution', '')}), licence of its "
             f"weights: {licence_text}",
             *[f"- {k}: `{v}`" for k, v in sorted(hashes.items())], "",
             "## CaO2 settings", "",
             *[f"- {k}: `{v}`" for k, v in config.items() if v not in (None, [])], "",
             "## Columns (train/metadata.jsonl)", "",
             "- `label`: position of the class in this set; `class_id`, `class_name`; `dataset_label`: the class's "
             "label in the full label space",
             "- `confidence`: the score OSS ranked the image by (`--select confidence`: the judge's probability of "
             "the class; `stability`: the cosine agreement of the judge's answers one sampler step before the end "
             "and at the end; null: not measured)",
             "- `judge_class`, `judge_probability`: the judge's top class for the image when it was selected and "
             "its probability (`output N` where that class is not in this set; null: not recorded)",
             "- `seed`, `pool_index`: the run seed and the sample's index in its class pool; sample i of a class is "
             "drawn from sha256('cao2/{seed}/{generator label}/{index}/{stream}')", "",
             "## Evaluation", ""]
    scores = evaluations(run.root)
    if scores:
        lines += ["| evaluation | protocol | test accuracy (%) |", "|---|---|---|",
                  *[f"| {a} | {b} | {c} |" for a, b, c in scores]]
    else:
        lines.append("No evaluation was found in the run folder (`cao2 eval`, `cao2 compare` write them).")
    versions = m.get("versions") or {}
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(header + lines)


def _check_hub_login(token: str | None) -> None:
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("--push needs huggingface_hub; pip install 'cao2[share]'") from None
    if not (token or huggingface_hub.get_token()):
        raise UserError("--push needs a Hugging Face token: run `huggingface-cli login` or set HF_TOKEN")


def _push(folder: Path, repo: str, token: str | None) -> str:
    import huggingface_hub
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                          commit_message="Upload a CaO2-distilled dataset (cao2 export)")
    except Exception as exc:        # the network and the Hub: one line, the export on disk stays
        raise UserError(f"--push {repo}: the upload failed ({reason(exc)}); the export is in {folder}; upload it "
                        f"later with `huggingface-cli upload {repo} {folder} --repo-type dataset`") from None
    return repo
