"""The distilled-set store: ImageFolder PNGs, per-class latents (safetensors), manifest.json, preview.png.

A class becomes visible only when complete: its files are written under temporary names and renamed, and
the manifest marks it complete last. An output folder that belongs to another run is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .errors import UserError

MANIFEST = "manifest.json"
FORMAT = "cao2-run/1"


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounding as torchvision's save_image does."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    def __init__(self, out: Path, run_id: str, header: dict):
        self.out = Path(out)
        self.run_id = run_id
        self.manifest = {"format": FORMAT, "run_id": run_id, **header, "classes": {}}

    def check(self) -> None:
        """Refuse an output folder that holds another run (or unknown files); touches nothing."""
        path = self.out / MANIFEST
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                raise UserError(f"{path} is unreadable; choose another --out or remove that folder") from None
            if old.get("run_id") != self.run_id:
                raise UserError(f"{self.out} holds a different run (its manifest's configuration differs); "
                                "choose another --out or remove that folder")
        elif self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise UserError(f"{self.out} exists and is not a cao2 output folder; choose another --out")

    def open(self) -> None:
        """Create the folder or take over the same run's manifest (completed classes are kept)."""
        path = self.out / MANIFEST
        if path.is_file():
            self.manifest["classes"] = json.loads(path.read_text()).get("classes", {})
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        (self.out / "latents").mkdir(exist_ok=True)
        self.save_manifest()

    def is_complete(self, cid: str) -> bool:
        entry = self.manifest["classes"].get(cid, {})
        return (entry.get("status") == "complete" and (self.out / "images" / cid).is_dir()
                and (self.out / "latents" / f"{cid}.safetensors").is_file())

    def write_class(self, cid: str, pixels: torch.Tensor, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        lat = self.out / "latents" / f"{cid}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=lat.parent, prefix=f".{lat.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"class": cid, "run_id": self.run_id})
            os.replace(tmp, lat)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        final = self.out / "images" / cid
        staging = Path(tempfile.mkdtemp(dir=self.out / "images", prefix=f".{cid}."))
        try:
            for i, arr in enumerate(to_uint8(pixels)):
                _image(arr).save(staging / f"{i}.png")
            if final.exists():           # left by an interrupted attempt of this same run
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.set_status(cid, dict(entry, status="complete"))

    def set_status(self, cid: str, entry: dict) -> None:
        self.manifest["classes"][cid] = entry
        self.save_manifest()

    def save_manifest(self) -> None:
        atomic_write_bytes(self.out / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())

    def load_latents(self, cid: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "latents" / f"{cid}.safetensors"))

    def write_preview(self, rows: list[tuple[np.ndarray, np.ndarray]], pad: int = 2) -> Path:
        """One row per class: the selected samples before CLO, a gap, the same samples after CLO."""
        h, w, c = rows[0][0].shape[1:]
        n = max(len(b) for b, _ in rows)
        width = (2 * n) * (w + pad) + 3 * pad + w // 2
        canvas = np.full((len(rows) * (h + pad) + pad, width, c), 255, np.uint8)
        for r, (before, after) in enumerate(rows):
            y = pad + r * (h + pad)
            for j, img in enumerate(before):
                x = pad + j * (w + pad)
                canvas[y:y + h, x:x + w] = img
            for j, img in enumerate(after):
                x = pad + n * (w + pad) + w // 2 + j * (w + pad)
                canvas[y:y + h, x:x + w] = img
        path = self.out / "preview.png"
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=".preview.", suffix=".png")
        os.close(fd)
        _image(canvas).save(tmp)
        os.replace(tmp, path)
        return path
