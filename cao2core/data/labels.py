"""Label spaces: which classes a run distills, their folder names, and their labels in the generator.

A label space is an ordered list of class ids with names. ``--dataset`` names a shipped one (mnist, nette, woof,
in100, in1k), one a generator plugin declares (``cao2_label_spaces``), or a text file with one class per line:
``ID [NAME...]``. A file of ImageNet wnids is an ImageNet subset: a class's generator label is its line in the
ImageNet-1K wnid list, its label inside the distilled set its position in the file (see data/imagenet/README.md).
Any other file is a label space of its own: a class's generator label is its position, for generators that take
any label space (text-conditioned ones) or declare that same file's classes.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..outputs import check_folder_name

IMAGENET_FILES = {"nette": "imagenette_wnids.txt", "woof": "imagewoof_wnids.txt",
                  "in100": "imagenet100_wnids.txt", "in1k": "imagenet1k_wnids.txt"}
DATASETS = ("mnist",) + tuple(IMAGENET_FILES)
IMAGENET_SPACES = {"in1k", "nette", "woof", "in100"}
WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class LabelSpace:
    name: str                          # dataset name, or the wnid file's path
    ids: tuple[str, ...]               # folder names in subset order (wnids, or "0".."9" for MNIST)
    names: tuple[str, ...]             # human-readable names, same order
    generator_labels: tuple[int, ...]  # label of each class in the generator's label space
    generator_space: str               # the label space the generator labels refer to ("mnist" or "in1k")

    def select(self, spec: str | None) -> "LabelSpace":
        """Keep the classes named by ``--classes``: comma-separated ids or positions, ``A-B`` ranges of positions."""
        if not spec:
            return self
        picked: list[int] = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if part in self.ids:
                picked.append(self.ids.index(part))
            elif "-" in part and all(x.isdigit() for x in part.split("-", 1)):
                a, b = (int(x) for x in part.split("-", 1))
                picked.extend(self._position(i, part) for i in range(a, b + 1))
            elif part.isdigit():
                picked.append(self._position(int(part), part))
            else:
                raise UserError(f"unknown class {part!r} in --classes for dataset {self.name}; "
                                f"give class ids such as {self.ids[0]!r} or positions 0-{len(self.ids) - 1}")
        if not picked:
            raise UserError("--classes selects no class; give class ids or positions")
        order = list(dict.fromkeys(picked))
        return LabelSpace(self.name, tuple(self.ids[i] for i in order), tuple(self.names[i] for i in order),
                          tuple(self.generator_labels[i] for i in order), self.generator_space)

    def _position(self, i: int, part: str) -> int:
        if not 0 <= i < len(self.ids):
            raise UserError(f"class position {i} (from {part!r}) is out of range for dataset {self.name} "
                            f"with {len(self.ids)} classes; use 0-{len(self.ids) - 1}")
        return i


def _data_file(name: str) -> list[str]:
    text = (importlib.resources.files("cao2core") / "data" / "imagenet" / name).read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def imagenet1k() -> tuple[list[str], list[str]]:
    """(wnids, names) of ImageNet-1K in label order."""
    return _data_file("imagenet1k_wnids.txt"), _data_file("imagenet1k_names.txt")


def from_pairs(name: str, pairs, generator_space: str | None = None) -> LabelSpace:
    """A label space of its own from (class id, class name) pairs in label order."""
    pairs = [(str(i), str(n)) for i, n in pairs]
    if not pairs:
        raise UserError(f"label space {name} lists no class; put one class id (and optionally its name) per line")
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"label space {name} lists class {dup!r} twice; each class must appear once")
    bad = [i for i in ids if not i or "/" in i or i.startswith(".")]
    if bad:
        raise UserError(f"label space {name}: class id {bad[0]!r} cannot name a folder; use ids without '/' or a "
                        "leading dot")
    for i in ids:
        check_folder_name(i, f"label space {name}: class id")
    return LabelSpace(name, tuple(ids), tuple(n for _, n in pairs), tuple(range(len(ids))), generator_space or name)


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(id, name) per non-empty line ``ID [NAME...]``; the name defaults to the id."""
    try:
        lines = path.read_text(encoding="utf-8").removeprefix("\ufeff").splitlines()   # a BOM is no class id
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"dataset file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    pairs = []
    for line in lines:
        parts = line.split(None, 1)
        if parts and not parts[0].startswith("#"):
            pairs.append((parts[0], parts[1].strip() if len(parts) > 1 else parts[0]))
    return pairs


def label_space(dataset: str, declared: dict | None = None) -> LabelSpace:
    """Resolve ``--dataset``: a shipped label space, one in ``declared`` ({name: [(id, name), ...]}, from the
    generator plugin), or a file."""
    if dataset == "mnist":
        digits = tuple(str(i) for i in range(10))
        return LabelSpace("mnist", digits, digits, tuple(range(10)), "mnist")
    if declared and dataset in declared:
        return from_pairs(dataset, declared[dataset])
    if dataset in IMAGENET_FILES:
        wnids, names = _data_file(IMAGENET_FILES[dataset]), None
    else:
        path = Path(dataset)
        if not path.is_file():
            known = ", ".join(DATASETS + tuple(declared or ()))
            raise UserError(f"unknown dataset {dataset!r}; use one of {known} or a file with one class per line "
                            "(ID [NAME])")
        pairs = read_pairs(path)
        if not pairs or not all(WNID.fullmatch(i) for i, _ in pairs):
            return from_pairs(dataset, pairs)               # a label space of its own
        in1k = set(imagenet1k()[0])
        unknown = [i for i, _ in pairs if i not in in1k]
        if unknown:         # wnids, but not ImageNet-1K's: a typo, not a label space of its own
            raise UserError(f"dataset {dataset}: {unknown[0]!r} is not an ImageNet-1K wnid; fix the class list")
        wnids = [i for i, _ in pairs]
        names = [n if n != i else None for i, n in pairs]
    all_wnids, all_names = imagenet1k()
    index = {w: i for i, w in enumerate(all_wnids)}
    if len(set(wnids)) != len(wnids):
        raise UserError(f"dataset {dataset} lists a wnid twice; each class must appear once")
    labels = tuple(index[w] for w in wnids)
    shown = tuple((names[k] if names and names[k] else all_names[i].split(",")[0]) for k, i in enumerate(labels))
    return LabelSpace(dataset, tuple(wnids), shown, labels, "in1k")
