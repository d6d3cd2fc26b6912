"""The distilled-set store: ImageFolder PNGs, per-class latents (safetensors), manifest.json, preview.png.

``manifest.json`` is written first, so an output folder is recognisably cao2's (and whose run) from its first
file on, whatever kill or full disk stops its creation. A class becomes visible only when complete: its files are
written under temporary names, listed in its record (``writing``), renamed into place, and the record is marked
``complete`` last. An output folder of another run is refused, or replaced with ``--overwrite``, which removes
only the files that run's manifest and records list (and cao2's temporary names), and refuses when there is
anything else. A complete class whose files no longer match its record is redone. Files and folders get the
mode the umask gives, as a distilled set is made to be shared.
"""
from __future__ import annotations

import contextlib
import errno
try:
    import fcntl
except ImportError:         # Windows: no advisory locks, so a killed run's temporary files stay
    fcntl = None
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import UserError
from .weights import stream_sha256

MANIFEST = "manifest.json"
FORMAT = "cao2-run/1"
VISIBLE_WAIT_S = 60      # how long rank 0 waits to see the other ranks' files (network file systems cache)
PREVIEW = "preview.png"
SUBFOLDERS = ("images", "latents", "records")
# what cao2's evaluations write under OUT/eval/ by default: `cao2 eval` (evaluate/report.py), the markers of
# `cao2 ablate` (ablate.py) and `cao2 sweep` (sweep.py), and `cao2 compare`'s evaluations (evaluate/compare.py);
# --overwrite removes these and refuses anything else there
EVAL_FOLDER = "eval"
EVAL_FILES = ("eval.json", "eval.png", "ablate.json", "sweep-measures.json", "compare.json", "compare.md",
              "compare-key.json")
EVAL_SUBFOLDERS = re.compile(r"compare(/(distilled|random-real)-[a-z0-9-]+)?")
SWAP_TRIES = 10          # renames of a class folder that another process keeps replacing, before giving up
IMAGE_NAME = re.compile(r"\d+\.png")
TOKEN = r"[a-z0-9_]{8}"    # the random part of a temporary name (cao2's own, and tempfile's in older runs)
# cao2's temporary names, per folder of a run: what a kill may leave behind
TEMP_NAMES = {
    # .preview.<token>.png: the preview's temporary name in earlier versions
    ".": re.compile(rf"\.((manifest\.json|preview\.png)\.{TOKEN}\.tmp|preview\.{TOKEN}\.png)"),
    "latents": re.compile(rf"\..+\.safetensors\.{TOKEN}\.tmp"),
    "records": re.compile(rf"\..+\.json\.{TOKEN}\.tmp"),
    EVAL_FOLDER: re.compile(rf"\.({'|'.join(map(re.escape, EVAL_FILES))})\.{TOKEN}\.tmp"),
}
STAGING = re.compile(rf"\.[^.].*\.{TOKEN}(\.old\d+)?")     # images/.<class>.<token>: a class folder being written
DEBRIS_AGE_S = 0.5        # a temporary name younger than this may not be locked by its writer yet (microseconds)


def identity_change(old: dict, new: dict) -> str:
    """What differs between the identities of two runs (their manifests' ``identity``), in words."""
    a, b = old.get("identity"), new.get("identity")
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "it was written by another version of cao2, which recorded no identity"

    def leaves(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(leaves(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out
    la, lb = leaves(a), leaves(b)
    changed = sorted(k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k))
    if not changed:
        return "its identity differs"
    key = changed[0]

    def short(v):
        return f"{v[:12]}…" if isinstance(v, str) and len(v) == 64 else json.dumps(v)
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    return f"{key} was {short(la.get(key))}, now {short(lb.get(key))}{more}"


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounding as torchvision's save_image does."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _png(arr: np.ndarray) -> bytes:
    image = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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



def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__


def new_file(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """(fd, path) of a new file with a unique name, created with the mode ``open()`` gives (mkstemp's is 0600)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def _new_folder(folder: Path, prefix: str) -> Path:
    """A new folder with a unique name, created with the mode ``mkdir()`` gives (mkdtemp's is 0700)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _lock(fd: int) -> None:
    """Mark a temporary file or folder as in use for as long as ``fd`` is open: ``sweep_debris`` leaves it."""
    if fcntl is not None:
        with contextlib.suppress(OSError):      # a file system without locks: the sweep then skips it too
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        _lock(fd)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked_folder(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        _lock(fd)
        yield path
    finally:
        os.close(fd)


def _abandoned(path: Path) -> bool:
    """A temporary file or folder that no process is writing: a killed run's. Its writer holds a lock on it
    (``_lock``); one too young to be locked yet, or one on a file system without locks, counts as in use."""
    if fcntl is None:
        return False
    try:
        if time.time() - path.lstat().st_mtime < DEBRIS_AGE_S:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_in(staging: Path, final: Path) -> None:
    """Rename the complete folder ``staging`` to ``final``. A folder already there (an interrupted attempt, or
    another process writing the same class at this moment) is first renamed aside and removed after: no step
    fails because the other process got there first."""
    asides = []
    try:
        for n in range(SWAP_TRIES):
            try:
                os.rename(staging, final)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
            aside = staging.with_name(f"{staging.name}.old{n}")
            try:
                os.rename(final, aside)
                asides.append(aside)
            except FileNotFoundError:
                pass                # the other process moved it aside first
        raise OSError(errno.EBUSY, f"{final} kept being replaced by another process")
    finally:
        for aside in asides:
            _remove(aside)


def _record_problem(record) -> str | None:
    """Why ``record`` is not a class record as cao2 writes it (None: it is)."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    if not isinstance(record.get("status"), str):
        return "has no status string"
    files = record.get("files")
    if files is None:
        return "lists no files" if record["status"] in ("complete", "writing") else None
    if not isinstance(files, dict) or not isinstance(files.get("latents"), str):
        return "has no file list"
    images = files.get("images")
    if not isinstance(images, dict) or not all(isinstance(k, str) and IMAGE_NAME.fullmatch(k) and isinstance(v, str)
                                               for k, v in images.items()):
        return "has no list of images"
    return None


class Store:
    """One run's output folder. Each class's record (``records/<class>.json``, with the sha256 of every file)
    lists its files before they are renamed into place (``writing``) and marks them ``complete`` after;
    ``manifest.json`` is the header plus all records, rewritten by rank 0. Several ranks may fill one store: each
    writes only its own classes' files and records.
    """

    def __init__(self, out: Path, run_id: str, header: dict, rank: int = 0, world_size: int = 1):
        self.out = Path(out)
        self.run_id = run_id
        self.rank, self.world_size = rank, world_size
        self.manifest = {"format": FORMAT, "run_id": run_id, **header, "classes": {}}
        self.redone: dict[str, str] = {}        # classes whose record or files say they must be written again
        self.this_run: dict[str, dict] = {}     # the records this process wrote, to send to the other ranks

    # --- whose folder it is ------------------------------------------------------------------------------------

    def _existing(self) -> dict | None:
        """The manifest of the cao2 run in ``out``; None when there is none yet (no folder, an empty one, or what
        an interrupted creation left). Refuses a folder cao2 did not write, or whose manifest is damaged."""
        if not self.out.exists():
            return None
        if not self.out.is_dir():
            raise UserError(f"{self.out} exists and is not a folder; choose another --out")
        path = self.out / MANIFEST
        if path.exists() and not path.is_file():
            raise UserError(f"{self.out} exists and is not a cao2 output folder; choose another --out")
        if not path.exists():
            left = [p for p in self.out.iterdir() if not (
                TEMP_NAMES["."].fullmatch(p.name) and p.is_file()
                or p.name in SUBFOLDERS and p.is_dir() and not p.is_symlink() and not any(p.iterdir()))]
            if left:
                raise UserError(f"{self.out} exists and is not a cao2 output folder; choose another --out")
            return None
        try:
            manifest = json.loads(path.read_bytes())
        except OSError as exc:
            raise UserError(f"cannot read {path} ({_reason(exc)}); fix its permissions or choose another --out"
                            ) from None
        except ValueError:
            manifest = None
        if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
            raise UserError(f"{self.out} exists and is not a cao2 output folder (its {MANIFEST} was not written "
                            "by cao2); choose another --out")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("run_id"), str):
            raise UserError(f"{path} is damaged (not the JSON object with a run id that cao2 writes), so cao2 "
                            f"cannot tell which run {self.out} holds; choose another --out or move that folder away")
        return manifest

    def _listed(self, manifest: dict) -> tuple[dict[str, set[str]], set[str]]:
        """(class -> the images its record lists, the classes whose record file is cao2's) of another run, from
        its manifest and its records (those of several ranks are in the manifest only once the run finished)."""
        entries = manifest.get("classes") if isinstance(manifest.get("classes"), dict) else {}
        ids = manifest.get("class_ids") if isinstance(manifest.get("class_ids"), list) else []
        recorded = {c for c in [*ids, *entries] if isinstance(c, str)}
        images: dict[str, set[str]] = {}

        def take(cid: str, record) -> None:
            if _record_problem(record) is None:
                recorded.add(cid)
                if record.get("files") is not None:
                    images.setdefault(cid, set()).update(record["files"]["images"])

        for cid, record in entries.items():
            take(cid, record)
        for path in sorted((self.out / "records").glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                take(path.stem, json.loads(path.read_bytes()))
        return images, recorded

    def _plan_removal(self, manifest: dict) -> list[Path]:
        """What another run wrote in ``out``, in the order to remove it: the files its manifest and records list
        (and cao2's temporary names), then their folders, then the records, so that an interrupted removal leaves
        only listed files. Refuses, naming it, the first file or folder at any depth that cao2 did not write."""
        images, recorded = self._listed(manifest)

        def wrote(rel: tuple[str, ...], is_folder: bool) -> bool:
            """Whether OUT/<rel> is a folder or file that cao2 writes."""
            name, where = rel[-1], rel[:-1]
            if not where:
                return (name in (*SUBFOLDERS, EVAL_FOLDER) if is_folder
                        else name in (MANIFEST, PREVIEW) or bool(TEMP_NAMES["."].fullmatch(name)))
            if where[0] == EVAL_FOLDER:
                return (bool(EVAL_SUBFOLDERS.fullmatch("/".join(rel[1:]))) if is_folder
                        else name in EVAL_FILES or bool(TEMP_NAMES[EVAL_FOLDER].fullmatch(name)))
            if where == ("images",):
                return is_folder and (name in images or bool(STAGING.fullmatch(name)))
            if is_folder:
                return False
            if where == ("latents",):
                return (name.endswith(".safetensors") and name[:-len(".safetensors")] in images
                        or bool(TEMP_NAMES["latents"].fullmatch(name)))
            if where == ("records",):
                return name.endswith(".json") and name[:-len(".json")] in recorded or bool(
                    TEMP_NAMES["records"].fullmatch(name))
            if len(where) == 2 and where[0] == "images":     # a listed image, or any image of a folder being staged
                cls = where[1]
                return bool(IMAGE_NAME.fullmatch(name)) if STAGING.fullmatch(cls) else name in images.get(cls, ())
            return False

        files, folders, records = [], [], []

        def walk(folder: Path, rel: tuple[str, ...]) -> None:
            for path, is_folder in self._entries(folder):
                sub = (*rel, path.name)
                if not wrote(sub, is_folder):
                    raise UserError(f"{self.out} holds {path.relative_to(self.out)}, which cao2 did not write; "
                                    "--overwrite replaces only cao2's files, so move it away or choose another --out")
                if is_folder:
                    walk(path, sub)
                    if len(sub) > 1 or sub[0] == EVAL_FOLDER:     # images/, latents/, records/ stay for the new run
                        folders.append(path)                      # after what it holds: deepest first
                elif sub[0] == "records":
                    records.append(path)
                elif sub != (MANIFEST,):                          # replaced by the new run's, last
                    files.append(path)

        walk(self.out, ())
        return files + folders + records

    @staticmethod
    def _entries(folder: Path) -> list[tuple[Path, bool]]:
        """(entry, is a real folder) of ``folder``: a symlink counts as a file, never followed."""
        with os.scandir(folder) as it:
            return sorted((Path(e.path), e.is_dir(follow_symlinks=False)) for e in it)

    def check(self, overwrite: bool = False) -> None:
        """Refuse an output folder that holds another run (unless ``overwrite``), anything cao2 did not write
        where ``overwrite`` would remove files, or a folder that cannot be written; touches nothing."""
        manifest = self._existing()
        if manifest is not None and manifest["run_id"] != self.run_id:
            if not overwrite:
                raise UserError(f"{self.out} holds a run of other inputs ({identity_change(manifest, self.manifest)}); "
                                "rerun with the inputs it was made with, choose another --out, or pass --overwrite "
                                "to replace it")
            self._plan_removal(manifest)
        parent = self.out
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {parent}; choose another --out or fix its permissions")

    def open(self) -> None:
        """Rank 0: create the folder (its manifest first), or replace another run's files (after
        ``check(overwrite=True)``), or take over this same run's records (complete classes are kept)."""
        manifest = self._existing()
        try:
            if manifest is None:
                self.out.mkdir(parents=True, exist_ok=True)
                for debris in self.out.iterdir():       # what an interrupted creation left
                    if TEMP_NAMES["."].fullmatch(debris.name):
                        debris.unlink()
                self._write_manifest()
            elif manifest["run_id"] != self.run_id:
                for path in self._plan_removal(manifest):
                    if path.is_dir() and not path.is_symlink():
                        path.rmdir()
                    else:
                        path.unlink(missing_ok=True)
                self._write_manifest()              # the folder is the new run's once the old one's files are gone
            for sub in SUBFOLDERS:
                (self.out / sub).mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot prepare the output folder {self.out} ({_reason(exc)}); free disk space or fix "
                            "permissions, then rerun the same command") from None
        self.load()
        self.save_manifest()

    # --- records -------------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the completion records (all ranks, after rank 0 opened the folder)."""
        records = {}
        for p in sorted((self.out / "records").glob("*.json")):
            try:
                record = json.loads(p.read_bytes())
            except (OSError, ValueError):
                self.redone[p.stem] = "its record is unreadable"
                continue
            problem = _record_problem(record)
            if problem:
                self.redone[p.stem] = f"its record {problem}"
            else:
                records[p.stem] = record
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
            if not path.is_file() or stream_sha256(path) != sha:
                return f"{rel} is missing or differs from what this run wrote"
        return None

    def write_class(self, cid: str, pixels: torch.Tensor, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        """Write a class's images and latents and mark it complete; a write that fails (full disk, permissions)
        is one UserError, and the classes already complete stay so."""
        with _interrupts_deferred():        # Ctrl-C lands after the class is whole, not halfway through it
            try:
                self._write_class(cid, pixels, tensors, entry)
            except (OSError, SafetensorError) as exc:
                raise UserError(f"cannot write class {cid} into {self.out} ({_reason(exc)}); free disk space or fix "
                                "permissions, then rerun the same command to continue") from None

    def _write_class(self, cid: str, pixels: torch.Tensor, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        latents = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                       # one key: safetensors orders several metadata keys differently in every process
                       metadata={"cao2": json.dumps({"class": cid, "run_id": self.run_id}, sort_keys=True)})
        final = self.out / "images" / cid
        staging = _new_folder(final.parent, f".{cid}.")
        try:
            with _locked_folder(staging):
                images = {}
                for i, arr in enumerate(to_uint8(pixels)):
                    png = _png(arr)
                    (staging / f"{i}.png").write_bytes(png)
                    images[f"{i}.png"] = hashlib.sha256(png).hexdigest()
                files = {"images": dict(sorted(images.items())),     # name order, as the records always listed them
                         "latents": hashlib.sha256(latents).hexdigest()}
                # listed before they appear: a kill in the next steps leaves only files a record lists
                self._write_record(cid, dict(entry, status="writing", files=files))
                atomic_write_bytes(self.out / "latents" / f"{cid}.safetensors", latents)
                _swap_in(staging, final)
        except BaseException:
            _remove(staging)
            raise
        self.set_status(cid, dict(entry, status="complete", files=files))

    def _write_record(self, cid: str, entry: dict) -> None:
        path = self.out / "records" / f"{cid}.json"
        try:
            atomic_write_bytes(path, (json.dumps(entry, indent=2) + "\n").encode())
        except OSError as exc:
            raise UserError(f"cannot write {path} ({_reason(exc)}); free disk space or fix permissions, then rerun "
                            "the same command to continue") from None

    def set_status(self, cid: str, entry: dict) -> None:
        self._write_record(cid, entry)
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
        self.sweep_debris()

    def sweep_debris(self) -> list[Path]:
        """Remove the temporary files and class folders a killed run left (those no live process holds); what
        was removed. The eval folder is left to the commands that write it."""
        found = [p for p in self.out.iterdir() if TEMP_NAMES["."].fullmatch(p.name)]
        for sub in ("latents", "records"):
            folder = self.out / sub
            found += [p for p in folder.iterdir() if TEMP_NAMES[sub].fullmatch(p.name)] if folder.is_dir() else []
        images = self.out / "images"
        found += [p for p in images.iterdir() if STAGING.fullmatch(p.name)] if images.is_dir() else []
        removed = [p for p in found if _abandoned(p)]
        for p in removed:
            with contextlib.suppress(OSError):
                _remove(p)
        return removed

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.out / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())

    def save_manifest(self) -> None:
        """Rewrite ``manifest.json``; a failed write is one UserError (the records, and so every complete class,
        are kept: the same command writes it again)."""
        try:
            self._write_manifest()
        except OSError as exc:
            raise UserError(f"cannot write {self.out / MANIFEST} ({_reason(exc)}); free disk space or fix "
                            "permissions, then rerun the same command (complete classes are kept)") from None

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
        path = self.out / PREVIEW
        try:
            atomic_write_bytes(path, _png(canvas))
        except OSError as exc:
            raise UserError(f"cannot write {path} ({_reason(exc)}); free disk space or fix permissions, then rerun "
                            "the same command") from None
        return path
