"""Where a class's pool comes from: sampled by the generator (``cao2 run``) or given as images (``cao2 refine``).

Both give the engine, for a group of classes, each class's pool latents (scaled, as the generator denoises
them), the latents of the sampler's state one step before the end when ``stability`` selection asks for it,
and how many to keep. The group's samples (or images) share chunks of ``--batch-size``; each one's draws come
from its own (seed, class, index) generator.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import UserError
from ..data.imagefolder import IMAGE_EXTS, check_image, class_folders, human_names, load_image, natural_key, norm_name
from ..data.labels import LabelSpace
from ..generators.seeding import unit_generator

SNAPSHOT_STEP = -2      # the sampler state ``stability`` selection compares with the final sample
MIN_IMAGE_FRACTION = 0.5  # refine: an image's short side must be at least half the generator's resolution


def batches(indices, size: int, bar=None):
    indices = list(indices)
    for i in range(0, len(indices), size):
        chunk = indices[i:i + size]
        yield chunk
        if bar is not None:
            bar.update(len(chunk))


class StepProgress:
    """Moves a bar by a chunk's samples: in whole samples as the generator reports its sampler steps, the rest
    (all of it, for a generator that reports no steps) when the chunk is done."""

    def __init__(self, bar, samples: int, steps: int | None):
        self.bar, self.samples, self.steps = bar, samples, steps
        self.seen = self.moved = 0

    def __call__(self) -> None:
        self.seen += 1
        if self.bar is not None and self.steps:
            target = min(self.samples, self.samples * self.seen // self.steps)
            self.bar.update(target - self.moved)
            self.moved = target

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(self.samples - self.moved)
            self.moved = self.samples


def in_chunks(fn, x: torch.Tensor, size: int) -> torch.Tensor:
    """``fn`` over ``x`` in chunks of ``size`` rows, concatenated: no call sees more than ``size``."""
    return torch.cat([fn(x[idx]) for idx in batches(range(len(x)), size)])


def _split(tensors: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.cat(tensors).split(sizes)) if tensors else []


def class_files(root: Path, space: LabelSpace) -> dict[str, list[Path]]:
    """Image files per class id of the class folders under ``root``, named by class id or class name."""
    by_name = {norm_name(n): cid for cid, n in zip(space.ids, space.names)}
    if space.generator_space == "in1k":     # any ImageNet synonym of a class of the space
        ids = set(space.ids)
        by_name.update({k: w for k, w in human_names().items() if w in ids and k not in by_name})
    files: dict[str, list[Path]] = {}
    for name, folder in class_folders(root, "--images").items():
        cid = name if name in space.ids else by_name.get(norm_name(name))
        if cid is None:
            raise UserError(f"--images folder {folder} maps to no class of dataset {space.name}; name class "
                            f"folders by class id (e.g. {space.ids[0]!r}) or class name (e.g. {space.names[0]!r})")
        if cid in files:
            raise UserError(f"--images folders {files[cid][0].parent.name!r} and {name!r} are both class {cid!r}; "
                            "merge them into one folder")
        entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=natural_key)
        odd = [p for p in entries if not p.is_file() or p.suffix.lower() not in IMAGE_EXTS]
        if odd:
            raise UserError(f"--images: {odd[0]} is not an image file ({', '.join(IMAGE_EXTS)}); move it out "
                            "of the class folders")
        if not entries:
            raise UserError(f"--images: class folder {folder} has no images; remove it or add images")
        files[cid] = entries
    return files


class SampledPool:
    """``cao2 run``: the generator samples pool-factor x IPC latents per class, each from its own seed."""

    def __init__(self, cfg, gen, handle, device):
        self.cfg, self.gen, self.handle, self.device = cfg, gen, handle, device

    def identity(self) -> None:
        return None

    def size(self, cid: str) -> int:
        return self.cfg.ipc * (self.cfg.pool_factor if self.cfg.select != "none" else 1)

    def keep(self, cid: str) -> int:
        return self.cfg.ipc

    def latents(self, classes: list[tuple[str, int]], batch_size: int, bar=None
                ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(pool, pool one sampler step before the end or None) of each (class id, generator label)."""
        snapshot = [SNAPSHOT_STEP] if self.cfg.select == "stability" else []
        units = [(label, i) for cid, label in classes for i in range(self.size(cid))]
        pools, befores = [], []
        steps = self.gen.spec.sample_steps if self.gen.spec is not None else None
        for chunk in batches(units, batch_size):
            moved = StepProgress(bar, len(chunk), steps)
            out = self.gen.sample(handle=self.handle, labels=torch.tensor([l for l, _ in chunk], device=self.device),
                                  generators=[unit_generator(self.cfg.seed, l, i, "sample") for l, i in chunk],
                                  snapshot_steps=snapshot, progress=moved)
            moved.done()
            pools.append(out.latents.float())
            if snapshot:
                befores.append(out.snapshots[SNAPSHOT_STEP].float())
        sizes = [self.size(cid) for cid, _ in classes]
        pools, befores = _split(pools, sizes), _split(befores, sizes)
        return [(p, befores[k] if snapshot else None) for k, p in enumerate(pools)]


class ImagePool:
    """``cao2 refine``: the pool of a class is its folder's images, encoded by the generator's VAE.

    Class folders are named by class id (wnid, or the digit for MNIST) or by a class name of the label space.
    Each image is converted to the generator's channels, its short side resized to the generator's resolution
    (bilinear, antialiased) and centre-cropped; images whose short side is under half that resolution are
    refused. Every file is checked before anything is written.
    """

    def __init__(self, root: str, space: LabelSpace, cfg, gen, handle, spec, device):
        self.root, self.cfg, self.gen, self.handle, self.device = Path(root), cfg, gen, handle, device
        if not gen.implements("cao2_encode"):
            raise UserError(f"generator {gen.name!r} has no encode hook, so it cannot refine existing images; "
                            "use a generator that implements cao2_encode (dit, mar)")
        with torch.no_grad():
            probe = gen.decode(handle=handle, latents=torch.zeros((1, *spec.shape), device=device))
        self.channels, self.resolution = probe.shape[1], probe.shape[-1]
        self.files = class_files(self.root, space)
        self.space = self._present(space)
        for cid in self.space.ids:
            for path in self.files[cid]:
                self._check(path)
        self.ipc = {cid: len(fs) if cfg.ipc == "all" else min(int(cfg.ipc), len(fs)) for cid, fs in self.files.items()}

    def _present(self, space: LabelSpace) -> LabelSpace:
        """The label space's classes that have a folder, in label-space order (``--classes`` narrows further)."""
        keep = [i for i, cid in enumerate(space.ids) if cid in self.files]
        if self.cfg.classes:
            chosen = space.select(self.cfg.classes)
            absent = [c for c in chosen.ids if c not in self.files]
            if absent:
                raise UserError(f"--classes asks for class {absent[0]!r} but --images has no folder for it")
            keep = [space.ids.index(c) for c in chosen.ids]
        return LabelSpace(space.name, *(tuple(getattr(space, f)[i] for i in keep) for f in
                                        ("ids", "names", "generator_labels")), space.generator_space)

    def _check(self, path: Path) -> None:
        w, h = check_image(path, "--images")
        if min(w, h) < MIN_IMAGE_FRACTION * self.resolution:
            raise UserError(f"--images: {path} is {w}x{h}, smaller than the minimum short side "
                            f"{int(MIN_IMAGE_FRACTION * self.resolution)} px for this {self.resolution} px "
                            "generator; use larger images")

    def identity(self) -> dict:
        """The source folder's fingerprint: sha256 over every used file's class, name and bytes."""
        digest = hashlib.sha256()
        for cid in self.space.ids:
            for path in self.files[cid]:
                digest.update(f"{cid}/{path.name}\0".encode())
                digest.update(hashlib.sha256(path.read_bytes()).digest())
        return {"images": str(self.root.resolve()), "sha256": digest.hexdigest(),
                "files": {cid: len(self.files[cid]) for cid in self.space.ids}}

    def size(self, cid: str) -> int:
        return len(self.files[cid])

    def keep(self, cid: str) -> int:
        return self.ipc[cid]

    def latents(self, classes: list[tuple[str, int]], batch_size: int, bar=None) -> list[tuple[torch.Tensor, None]]:
        """(encoded images, None) of each (class id, generator label)."""
        units = [(cid, label, i) for cid, label in classes for i in range(self.size(cid))]
        out = []
        for chunk in batches(units, batch_size, bar):
            pixels = torch.stack([load_image(self.files[c][i], self.channels, self.resolution, role="--images")
                                  for c, _, i in chunk])
            pixels = pixels.float().div(127.5).sub(1.0).to(self.device)
            out.append(self.gen.encode(handle=self.handle, pixels=pixels, generators=[
                unit_generator(self.cfg.seed, l, i, "encode") for _, l, i in chunk]).float())
        return [(p, None) for p in _split(out, [self.size(cid) for cid, _ in classes])]
