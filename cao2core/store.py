"""The distilled-set store: ImageFolder PNGs, per-class latents (safetensors), manifest.json, preview.png.

A class becomes visible only when complete: its files are written under temporary names and renamed, and
its record marks it complete last. An output folder that belongs to another run is refused (or replaced with
``--overwrite``); a complete class whose files no longer match its record is redone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .errors import UserError

MANIFEST = "manifest.json"
FORMAT = "cao2-run/1"
VISIBLE_WAIT_S = 60      # how long rank 0 waits to see the other ranks' files (network file systems cache)
OWN_NAMES = (MANIFEST, "images", "latents", "records", "preview.png", "eval")   # what a run (and its eval) writes


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounding as torchvision's save_image does."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold SIGINT until the block is done (main thread only), then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """One run's output folder. Each class's completion record (``records/<class>.json``, with the sha256 of
    every file) is written last, after its images and latents; ``manifest.json`` is the header plus all records,
    rewritten by rank 0. Several ranks may fill one store: each writes only its own classes' files and records.
    """

    def __init__(self, out: Path, run_id: str, header: dict, rank: int = 0, world_size: int = 1):
        self.out = Path(out)
        self.run_id = run_id
        self.rank, self.world_size = rank, world_size
        self.manifest = {"format": FORMAT, "run_id": run_id, **header, "classes": {}}
        self.redone: dict[str, str] = {}        # complete classes whose files no longer match their record
        self.this_run: dict[str, dict] = {}     # the records this process wrote, to send to the other ranks

    def check(self, overwrite: bool = False) -> None:
        """Refuse an output folder that holds another run (unless ``overwrite``), unknown files, or that cannot
        be written; touches nothing."""
        path = self.out / MANIFEST
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                raise UserError(f"{path} is unreadable; choose another --out or remove that folder") from None
            if old.get("run_id") != self.run_id and not overwrite:
                raise UserError(f"{self.out} holds a different run (its manifest's configuration differs); "
                                "choose another --out, or pass --overwrite to replace it")
            unknown = [p.name for p in self.out.iterdir() if p.name not in OWN_NAMES]
            if unknown and old.get("run_id") != self.run_id:
                raise UserError(f"--overwrite would leave {self.out / unknown[0]}, which cao2 did not write; "
                                "move it away or choose another --out")
        elif self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise UserError(f"{self.out} exists and is not a cao2 output folder; choose another --out")
        parent = self.out
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {parent}; choose another --out or fix its permissions")

    def open(self) -> None:
        """Rank 0: create the folder, or replace another run's files (after ``check(overwrite=True)``), or take
        over this same run's records (complete classes are kept)."""
        path = self.out / MANIFEST
        if path.is_file() and json.loads(path.read_text()).get("run_id") != self.run_id:
            for name in OWN_NAMES:
                target = self.out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        for sub in ("images", "latents", "records"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.load()
        self.save_manifest()

    def load(self) -> None:
        """Read the completion records (all ranks, after rank 0 opened the folder)."""
        records = {}
        for p in sorted((self.out / "records").glob("*.json")):
            try:
                records[p.stem] = json.loads(p.read_text())
            except (OSError, ValueError):
                self.redone[p.stem] = "its record is unreadable"
        self.manifest["classes"] = records

    def recorded_complete(self, cid: str) -> bool:
        """The class's record says complete (its files are not read)."""
        return self.manifest["classes"].get(cid, {}).get("status") == "complete"

    def is_complete(self, cid: str) -> bool:
        """Complete, and every file still matches the sha256 its record holds (reads and hashes the files)."""
        if not self.recorded_complete(cid):
            return False
        bad = self._mismatch(cid, self.manifest["classes"][cid].get("files") or {})
        if bad:
            self.redone[cid] = bad
        return not bad

    def _mismatch(self, cid: str, files: dict) -> str | None:
        expected = {f"images/{cid}/{name}": sha for name, sha in files.get("images", {}).items()}
        expected[f"latents/{cid}.safetensors"] = files.get("latents")
        folder = self.out / "images" / cid
        on_disk = {f"images/{cid}/{p.name}" for p in folder.iterdir()} if folder.is_dir() else set()
        if on_disk != {k for k in expected if k.startswith("images/")}:
            return f"images/{cid} does not hold the files its record lists"
        for rel, sha in expected.items():
            path = self.out / rel
            if not path.is_file() or _sha256(path) != sha:
                return f"{rel} is missing or differs from what this run wrote"
        return None

    def write_class(self, cid: str, pixels: torch.Tensor, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        with _interrupts_deferred():        # Ctrl-C lands after the class is whole, not halfway through it
            self._write_class(cid, pixels, tensors, entry)

    def _write_class(self, cid: str, pixels: torch.Tensor, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        lat = self.out / "latents" / f"{cid}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=lat.parent, prefix=f".{lat.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                      # one key: safetensors orders several metadata keys differently in every process
                      metadata={"cao2": json.dumps({"class": cid, "run_id": self.run_id}, sort_keys=True)})
            os.replace(tmp, lat)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        final = self.out / "images" / cid
        staging = Path(tempfile.mkdtemp(dir=self.out / "images", prefix=f".{cid}."))
        try:
            for i, arr in enumerate(to_uint8(pixels)):
                _image(arr).save(staging / f"{i}.png")
            images = {p.name: _sha256(p) for p in sorted(staging.iterdir())}
            if final.exists():           # left by an interrupted or corrupted attempt of this same run
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.set_status(cid, dict(entry, status="complete", files={"images": images, "latents": _sha256(lat)}))

    def set_status(self, cid: str, entry: dict) -> None:
        atomic_write_bytes(self.out / "records" / f"{cid}.json", (json.dumps(entry, indent=2) + "\n").encode())
        self.manifest["classes"][cid] = entry
        self.this_run[cid] = entry
        if self.world_size == 1:
            self.save_manifest()

    def collect(self, sent: list[dict[str, dict]]) -> None:
        """Every class's record after all ranks are done: those read at the start (``load``) updated with what
        each rank sent of this run's, in rank order. Nothing is read again: a file system shared by several
        nodes may list a fresh file late."""
        for entries in sent:
            self.manifest["classes"].update(entries)

    def finish(self, sent: list[dict[str, dict]], wait_s: float = VISIBLE_WAIT_S) -> None:
        """Rank 0, after every rank is done: the manifest lists every class's record. Refuses to write it when
        this rank cannot see the records the other ranks wrote: their nodes do not share ``--out``."""
        self.collect(sent)
        theirs = [self.out / "records" / f"{cid}.json" for r, entries in enumerate(sent) if r != self.rank
                  for cid in entries]
        deadline = time.monotonic() + wait_s
        while (missing := [p for p in theirs if not p.is_file()]) and time.monotonic() < deadline:
            time.sleep(0.5)
        if missing:
            raise UserError(f"rank {self.rank} cannot see {missing[0]}, which another rank wrote: under torchrun "
                            "on several nodes, --out must be a folder on a file system every node shares")
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
