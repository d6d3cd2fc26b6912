"""Label spaces: which classes a run distills, their folder names, and their labels in the generator.

``--dataset`` names a shipped list (mnist, nette, woof, in100, in1k) or a text file of ImageNet wnids. A
subset class's generator label is its line in the ImageNet-1K wnid list; its label inside the distilled set
is its position in the subset list (see data/imagenet/README.md).
"""
from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

IMAGENET_FILES = {"nette": "imagenette_wnids.txt", "woof": "imagewoof_wnids.txt",
                  "in100": "imagenet100_wnids.txt", "in1k": "imagenet1k_wnids.txt"}
DATASETS = ("mnist",) + tuple(IMAGENET_FILES)
IMAGENET_SPACES = {"in1k", "nette", "woof", "in100"}


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


def label_space(dataset: str) -> LabelSpace:
    """Resolve ``--dataset`` to a label space."""
    if dataset == "mnist":
        digits = tuple(str(i) for i in range(10))
        return LabelSpace("mnist", digits, digits, tuple(range(10)), "mnist")
    if dataset in IMAGENET_FILES:
        wnids = _data_file(IMAGENET_FILES[dataset])
    else:
        path = Path(dataset)
        if not path.is_file():
            raise UserError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)} or a file of wnids")
        wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        if not wnids:
            raise UserError(f"dataset file {dataset} lists no wnid; put one ImageNet wnid per line")
    all_wnids, all_names = imagenet1k()
    index = {w: i for i, w in enumerate(all_wnids)}
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise UserError(f"dataset {dataset}: {unknown[0]!r} is not an ImageNet-1K wnid; fix the class list")
    if len(set(wnids)) != len(wnids):
        raise UserError(f"dataset {dataset} lists a wnid twice; each class must appear once")
    labels = tuple(index[w] for w in wnids)
    return LabelSpace(dataset, tuple(wnids), tuple(all_names[i].split(",")[0] for i in labels), labels, "in1k")
