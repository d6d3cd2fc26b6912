"""Label spaces, folder layouts and image sets for ``cao2 eval``.

Every image set carries labels that are positions in one label space (``cao2core.data.labels``), found from class
folder *names*, never from folder order. Layouts that would silently scramble labels are refused before any
training: numeric folders as RDED writes them (``00000``..``00009``) without ``--class-map``, another subset's
classes (fastai's imagenette2/imagewoof2 trees against a different run), folders named by human-readable class
names, and missing or extra classes.

Images are held as uint8 tensors (N, C, S, S); a large real folder stays on disk and is read in batches.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import default_collate

from ..errors import UserError
from ..data.imagefolder import IMAGE_EXTS, class_folders, human_names, image_files, load_image, norm_name
from ..data.labels import IMAGENET_FILES, LabelSpace, from_pairs, label_space
from ..generators.seeding import unit_seed
from ..store import MANIFEST

MNIST_SIZE = 32
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VAL_CROP_PCT = 0.875          # real validation images: resize the short side to S / 0.875, centre crop S
CACHE_BYTES = 1 << 30         # real folders up to this size (decoded) are held in memory


# --- label spaces ----------------------------------------------------------------------------------------------


def is_mnist(space: LabelSpace) -> bool:
    return space.generator_space == "mnist"


def world(space: LabelSpace, image_size: int | None) -> tuple[int, int, tuple, tuple]:
    """(channels, image size, mean, std) of a label space's images as the student sees them."""
    if is_mnist(space):
        if image_size not in (None, MNIST_SIZE):
            raise UserError(f"MNIST images are {MNIST_SIZE}x{MNIST_SIZE}; drop --image-size {image_size}")
        return 1, MNIST_SIZE, (0.5,), (0.5,)
    return 3, image_size or 224, IMAGENET_MEAN, IMAGENET_STD


@functools.lru_cache(maxsize=None)
def _shipped_spaces() -> dict[str, frozenset]:
    spaces = {name: frozenset(label_space(name).ids) for name in IMAGENET_FILES}
    spaces["mnist"] = frozenset(label_space("mnist").ids)
    return spaces


# --- folder layouts --------------------------------------------------------------------------------------------


def read_class_map(path: str | None) -> dict[str, str] | None:
    """``--class-map FILE``: one ``FOLDER CLASS_ID`` pair per line (# comments allowed)."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        raise UserError(f"--class-map {path} cannot be read; give a text file of 'FOLDER CLASS_ID' lines") from None
    mapping: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"--class-map {path} line {n}: expected 'FOLDER CLASS_ID', got {line!r}")
        if parts[0] in mapping:
            raise UserError(f"--class-map {path} line {n}: folder {parts[0]!r} is mapped twice")
        mapping[parts[0]] = parts[1]
    if len(set(mapping.values())) != len(mapping):
        raise UserError(f"--class-map {path} maps two folders to the same class")
    return mapping


def check_layout(root: Path, space: LabelSpace, role: str, class_map: dict[str, str] | None = None
                 ) -> dict[str, list[Path]]:
    """Image files per class id of ``space``; refuses any layout whose folders are not exactly its classes."""
    folders = class_folders(root, role)
    if class_map is not None and any(f in class_map for f in folders):
        renamed: dict[str, Path] = {}
        for f, p in folders.items():
            cid = class_map.get(f, f)
            if cid in renamed:
                raise UserError(f"{role} folder {root}: --class-map gives two folders class {cid!r}; "
                                "map each folder to a different class id")
            renamed[cid] = p
        folders = renamed
    names = set(folders)
    ids = set(space.ids)
    if names != ids:
        raise UserError(_diagnose(root, role, sorted(names), space, mapped=class_map is not None))
    files = {cid: image_files(folders[cid]) for cid in space.ids}
    empty = [cid for cid, fs in files.items() if not fs]
    if empty:
        raise UserError(f"{role} folder {root}: class folder {folders[empty[0]].name!r} has no images "
                        f"({', '.join(IMAGE_EXTS)}); every class of dataset {space.name} needs at least one")
    return files


def _diagnose(root: Path, role: str, names: list[str], space: LabelSpace | None, mapped: bool = False) -> str:
    """Why the folder names are not the classes of ``space`` (None: no --dataset given), as one line."""
    where = f"{role} folder {root}"
    ids = set(space.ids) if space is not None else set()
    target = f"dataset {space.name}" if space is not None else "the dataset"
    numeric = all(n.isdigit() for n in names)
    padded = any(len(n) > 1 and n.startswith("0") for n in names)      # 00000, 00001, ... (RDED)
    digit_ids = bool(ids) and all(i.isdigit() for i in ids)
    if space is None and not mapped and (partial := _partial_space(names)) is not None:
        return _missing_classes(where, names, partial)
    if not mapped and numeric and not set(names) <= ids and (padded or not digit_ids):
        second = f"{names[1]}, " if len(names) > 1 else ""
        return (f"{where} has numeric class folders ({names[0]}, {second}...) as RDED writes them; their numbers "
                f"do not say which class of {target} each is: pass --class-map FILE ('FOLDER CLASS_ID' per "
                "line)" + (" and --dataset" if space is None else "") + " or rename the folders to class ids")
    if space is not None:
        for other, members in _shipped_spaces().items():
            if set(names) == members and other != space.name:
                hint = {"nette": " (e.g. fastai's imagenette2)", "woof": " (e.g. fastai's imagewoof2)"}.get(other, "")
                return (f"{where} holds the classes of dataset {other}{hint}, but this evaluation uses dataset "
                        f"{space.name}; point it at {space.name}'s data or pass --dataset {other}")
    human = human_names()
    named = [n for n in names if norm_name(n) in human and n not in ids]
    if named and len(named) * 2 >= len(names):
        return (f"{where} names its class folders by class name ({named[0]!r}, ...), not by wnid; rename each "
                f"folder to its wnid (e.g. {named[0]!r} -> {human[norm_name(named[0])]!r}; see "
                "cao2core/data/imagenet/imagenet1k_names.txt) or pass --class-map FILE")
    if space is None:
        return (f"cannot tell which label space {where} uses from its folder names; pass --dataset "
                "(mnist, nette, woof, in100, in1k or a file of wnids)")
    missing = [c for c in space.ids if c not in set(names)]
    extra = [n for n in names if n not in ids]
    parts = []
    if missing:
        parts.append(f"{len(missing)} class(es) missing (first: {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} folder(s) not in the dataset (first: {extra[0]!r})")
    return (f"{where} does not hold exactly the {len(space.ids)} classes of dataset {space.name}: "
            f"{', '.join(parts)}; give a folder with one subfolder per class id")


def _partial_space(names: list[str]) -> LabelSpace | None:
    """The smallest shipped label space that holds every folder name and more: some of its classes are missing."""
    holders = [other for other, members in _shipped_spaces().items() if set(names) < members]
    return label_space(min(holders, key=lambda n: len(_shipped_spaces()[n]))) if holders else None


def _missing_classes(where: str, names: list[str], space: LabelSpace) -> str:
    missing = [c for c in space.ids if c not in set(names)]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    subset = ("" if is_mnist(space) else
              ", or pass --dataset FILE listing exactly the wnids of its folders")
    return (f"{where} has {len(names)} of the {len(space.ids)} class folders of dataset {space.name}: folder "
            f"{missing[0]!r}{more} is missing; add the missing class folders or finish the cao2 run that writes "
            f"them (a run distilled with --classes is evaluated by passing its output folder, the one holding "
            f"{MANIFEST}){subset}")


def infer_space(root: Path, role: str) -> LabelSpace:
    """The shipped label space whose class ids are exactly the folder names (for ``--data`` without --dataset)."""
    names = set(class_folders(root, role))
    for name, members in _shipped_spaces().items():
        if names == members:
            return label_space(name)
    raise UserError(_diagnose(root, role, sorted(names), None))


# --- image sets ------------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Images with labels = positions in the evaluation's label space; in memory or on disk."""

    description: str
    labels: torch.Tensor                       # (N,) int64
    channels: int
    size: int
    pixels: torch.Tensor | None = None         # (N, C, S, S) uint8, or None when on disk
    files: list[Path] | None = None
    crop_pct: float = 1.0
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def per_class(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()

    def subset(self, indices: torch.Tensor, description: str, **info) -> "ImageSet":
        idx = indices.long()
        return ImageSet(description, self.labels[idx], self.channels, self.size,
                        None if self.pixels is None else self.pixels[idx],
                        None if self.files is None else [self.files[i] for i in idx.tolist()],
                        self.crop_pct, {**self.info, **info})

    def cache(self, workers: int = 0, limit: int = CACHE_BYTES) -> "ImageSet":
        """Read an on-disk set into memory when it is small enough."""
        if self.pixels is None and len(self) * self.channels * self.size ** 2 <= limit:
            self.pixels = torch.cat([x for x, _ in self.batches(torch.arange(len(self)), 256, workers)])
        return self

    def batches(self, order: torch.Tensor, batch_size: int, workers: int = 0):
        """(uint8 images, labels) in ``order``, ``batch_size`` at a time."""
        chunks = list(torch.split(order.long(), batch_size))
        if self.pixels is not None:
            for idx in chunks:
                yield self.pixels[idx], self.labels[idx]
            return
        dataset = _Files(self.files, self.labels, self.channels, self.size, self.crop_pct)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[c.tolist() for c in chunks],
                                             num_workers=workers, collate_fn=_collate)
        for batch in loader:
            if isinstance(batch, _Unreadable):
                raise UserError(batch.message)
            yield batch


class _Unreadable:
    """A file a loader worker refused: its message travels as data, since a worker's exception comes back
    wrapped in a multi-line traceback."""

    def __init__(self, message: str):
        self.message = message


class _Files(torch.utils.data.Dataset):
    def __init__(self, files, labels, channels, size, crop_pct):
        self.files, self.labels, self.channels, self.size, self.crop_pct = files, labels, channels, size, crop_pct

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return load_image(self.files[i], self.channels, self.size, self.crop_pct), self.labels[i]
        except UserError as exc:
            return _Unreadable(str(exc))


def _collate(items):
    return next((x for x in items if isinstance(x, _Unreadable)), None) or default_collate(items)


def folder_set(files: dict[str, list[Path]], space: LabelSpace, description: str, channels: int, size: int,
               crop_pct: float = 1.0, **info) -> ImageSet:
    paths, labels = [], []
    for pos, cid in enumerate(space.ids):
        paths += files[cid]
        labels += [pos] * len(files[cid])
    return ImageSet(description, torch.tensor(labels, dtype=torch.long), channels, size, files=paths,
                    crop_pct=crop_pct, info=info)


def mnist_set(split: str, space: LabelSpace) -> ImageSet:
    """The built-in MNIST split, restricted to the classes of ``space`` and relabelled to its positions."""
    from ..data.mnist import load_split
    x, y = load_split(split)
    digits = [int(c) for c in space.ids]
    keep = torch.isin(y, torch.tensor(digits))
    lookup = torch.full((10,), -1, dtype=torch.long)
    lookup[torch.tensor(digits)] = torch.arange(len(digits))
    pixels = ((x[keep] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(f"MNIST {split} split (built in)", lookup[y[keep]], 1, MNIST_SIZE, pixels=pixels,
                    info={"source": f"mnist:{split}"})


# --- what the command evaluates ----------------------------------------------------------------------------------


@dataclass
class Distilled:
    space: LabelSpace          # the classes of the distilled set (a run's --classes narrows its dataset)
    full_space: LabelSpace     # the whole dataset: real folders hold all its classes
    images: dict[str, list[Path]]
    root: Path
    is_run: bool               # a ``cao2 run`` output (manifest.json + images/)
    info: dict


def _read_manifest(path: Path) -> dict:
    """A run's manifest, refused in one line unless it has the shape ``cao2 run`` writes."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        manifest = None
    ok = (isinstance(manifest, dict) and isinstance(manifest.get("dataset"), str)
          and isinstance(manifest.get("class_ids"), list) and all(isinstance(c, str) for c in manifest["class_ids"])
          and isinstance(manifest.get("classes", {}), dict))
    if not ok:
        raise UserError(f"{path} is unreadable or not a cao2 run manifest; pass the images folder itself as --data")
    return manifest


def _listed(record, name: str) -> bool:
    """Whether a class record lists the image ``name`` (a record without a list, as older runs wrote: any)."""
    files = record.get("files") if isinstance(record, dict) else None
    images = files.get("images") if isinstance(files, dict) else None
    return not isinstance(images, dict) or name in images


def open_distilled(path: str, dataset: str | None, class_map: dict[str, str] | None) -> Distilled:
    root = Path(path)
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
        ids, run_dataset, status = manifest["class_ids"], manifest["dataset"], manifest.get("classes", {})
        incomplete = [c for c in ids if not isinstance(status.get(c), dict) or status[c].get("status") != "complete"]
        if incomplete:
            raise UserError(f"{root} is an unfinished cao2 run ({len(incomplete)} of {len(ids)} classes not "
                            f"complete, first {incomplete[0]!r}); rerun its `cao2 run` command to finish it")
        try:
            full = label_space(dataset or run_dataset)
        except UserError:
            if dataset or not isinstance(manifest.get("class_names"), list):
                raise
            # a label space of the generator plugin's own: the manifest lists its classes
            full = from_pairs(run_dataset, zip(ids, manifest["class_names"]), manifest.get("generator_space"))
        unknown = [c for c in ids if c not in full.ids]
        if unknown:
            raise UserError(f"{root} was distilled for dataset {run_dataset}, whose class {unknown[0]!r} is not "
                            f"in --dataset {dataset}; drop --dataset or pass a matching one")
        space = full.select(",".join(c for c in full.ids if c in set(ids)))
        gone = [c for c in space.ids if not (root / "images" / c).is_dir()]
        if gone and class_map is None:
            raise UserError(f"{root} is a cao2 run whose manifest lists class {gone[0]!r} as complete, but its "
                            f"folder images/{gone[0]} is missing; rerun its `cao2 run` command to redo it")
        files = check_layout(root / "images", space, "distilled", class_map)
        if class_map is None:       # what a person or a file browser added to a class folder is not the set
            files = {cid: [f for f in paths if _listed(status.get(cid), f.name)] for cid, paths in files.items()}
        config = manifest.get("config")
        info = {"layout": "cao2 run", "run_id": manifest.get("run_id"), "dataset": run_dataset,
                "run_ipc": config.get("ipc") if isinstance(config, dict) else None}
        return Distilled(space, full, files, root, True, info)
    if (root / "images").is_dir() and not any(p.is_dir() and p.name != "images" and not p.name.startswith(".")
                                             for p in root.iterdir()):
        raise UserError(f"{root} has images/ but no {MANIFEST}; pass {root / 'images'} as --data if it is an "
                        "ImageFolder, or finish the cao2 run that writes it")
    full = label_space(dataset) if dataset else infer_space(root, "distilled")
    files = check_layout(root, full, "distilled", class_map)
    return Distilled(full, full, files, root, False, {"layout": "image folder"})


def real_folder(path: str, full_space: LabelSpace, space: LabelSpace, role: str,
                class_map: dict[str, str] | None) -> dict[str, list[Path]]:
    """Files per class of ``space`` from a real-data folder that must hold exactly the dataset's classes."""
    files = check_layout(Path(path), full_space, role, class_map)
    return {cid: files[cid] for cid in space.ids}


def random_real_indices(labels: torch.Tensor, num_classes: int, ipc: int, seed: int, repeat: int,
                        description: str = "the training set") -> torch.Tensor:
    """``ipc`` indices per class, drawn per class from a generator seeded by (seed, class, repeat)."""
    picked = []
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        if len(rows) < ipc:
            raise UserError(f"--random-real {ipc}: class position {c} of {description} has only {len(rows)} "
                            "images; lower the IPC")
        g = torch.Generator().manual_seed(unit_seed(seed, c, repeat, "eval/random-real"))
        picked.append(rows[torch.randperm(len(rows), generator=g)[:ipc]])
    return torch.cat(picked)
