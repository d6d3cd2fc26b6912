"""The run's records: ImageFolder PNGs, per-class latents (safetensors), manifest.json, preview.png.

``manifest.json`` is written first, so an output folder is recognisably cao2's (and whose run) from its first
file on, whatever kill or full disk stops its creation. A class becomes visible only when complete: its files are
written under temporary names, listed in its record (``writing``), renamed into place, and the record is marked
``complete`` last. An output folder of another run is refused, or replaced with ``--overwrite``, which removes
only the files that run's manifest and records list (and cao2's temporary names), and refuses when there is
anything else. A complete class whose files no longer match its record is redone. Files a class folder holds
that its record does not list are foreign (a person's, a file browser's ``.DS_Store``): kept, never a reason to
redo the class; a class written again into a folder that holds them is written beside them, its images replaced
one by one under a record that says ``writing``. cao2 writes only inside the run folder: a sub-folder of its
layout that is a symbolic link is refused. Files and folders get the mode the umask gives, as
a distilled set is made to be shared.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..errors import UserError, reason
from ..generators.weights import stream_sha256
from .files import (abandoned, atomic_write_bytes, interrupts_deferred, locked_folder, new_folder, remove_path,
                    swap_in)
from .identity import identity_change
from .images import png_bytes, preview_canvas, to_uint8
from .layout import (EVAL_FOLDER, FORMAT, IMAGE_NAME, MANIFEST, PREVIEW, REPORT_FOLDER, REPORT_STAGING, STAGING,
                     SUBFOLDERS, TEMP_NAMES, eval_files, eval_subfolder, eval_temp_name)

VISIBLE_WAIT_S = 60      # how long rank 0 waits to see the other ranks' files (network file systems cache)


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
        self.foreign_reported = False           # the files no record lists are named once per run, by rank 0

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
            raise UserError(f"cannot read {path} ({reason(exc)}); fix its permissions or choose another --out"
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
        eval_names, eval_temp, eval_folders = eval_files(), eval_temp_name(), eval_subfolder()

        def wrote(rel: tuple[str, ...], is_folder: bool) -> bool:
            """Whether OUT/<rel> is a folder or file that cao2 writes."""
            name, where = rel[-1], rel[:-1]
            if not where:
                return (name in (*SUBFOLDERS, EVAL_FOLDER, REPORT_FOLDER) or bool(REPORT_STAGING.fullmatch(name))
                        if is_folder else name in (MANIFEST, PREVIEW) or bool(TEMP_NAMES["."].fullmatch(name)))
            if REPORT_STAGING.fullmatch(where[0]):      # a report that was being written: all of it is cao2's
                return True
            if where[0] == REPORT_FOLDER:   # `cao2 report`: index.html, before/<class>/<i>.png, pool/<class>/<i>.png
                inner = rel[1:]                # and pool/<class>.html
                if inner == ("index.html",):
                    return not is_folder
                if inner[0] not in ("before", "pool") or len(inner) > 3:
                    return False
                if inner[0] == "pool" and len(inner) == 2 and not is_folder:
                    return name.endswith(".html")
                return is_folder if len(inner) < 3 else bool(IMAGE_NAME.fullmatch(name)) and not is_folder
            if where[0] == EVAL_FOLDER:
                return (bool(eval_folders.fullmatch("/".join(rel[1:]))) if is_folder
                        else name in eval_names or bool(eval_temp.fullmatch(name)))
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
                return bool(IMAGE_NAME.fullmatch(name)) if STAGING.fullmatch(cls) else (
                    name in images.get(cls, ()) or bool(TEMP_NAMES["class"].fullmatch(name)))
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
                    if len(sub) > 1 or sub[0] in (EVAL_FOLDER, REPORT_FOLDER) or REPORT_STAGING.fullmatch(sub[0]):
                        # images/, latents/, records/ stay for the new run
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
        self._refuse_links()
        parent = self.out
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {parent}; choose another --out or fix its permissions")

    def _refuse_links(self) -> None:
        """Refuse a sub-folder of the run's layout (images/, latents/, records/, eval/, a class's images/<class>)
        that is a symbolic link or not a folder: writing through it would replace files outside the run folder."""
        if not self.out.is_dir():
            return
        ids = self.manifest.get("class_ids") if isinstance(self.manifest.get("class_ids"), list) else []
        for rel in (*SUBFOLDERS, EVAL_FOLDER, *(f"images/{cid}" for cid in ids if isinstance(cid, str))):
            path = self.out / rel
            if path.is_symlink():
                raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}) and cao2 writes only inside "
                                f"its output folder; replace {rel} with a real folder (copy in what it should keep) "
                                "or choose another --out")
            if path.exists() and not path.is_dir():
                raise UserError(f"{path} is a file where cao2 keeps its {rel} folder; move it away or choose "
                                "another --out")

    def open(self) -> None:
        """Rank 0: create the folder (its manifest first), or replace another run's files (after
        ``check(overwrite=True)``), or take over this same run's records (complete classes are kept)."""
        self._refuse_links()
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
            raise UserError(f"cannot prepare the output folder {self.out} ({reason(exc)}); free disk space or fix "
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
        if self.rank == 0 and not self.foreign_reported:
            self.foreign_reported = True
            self._report_foreign()

    def _report_foreign(self, shown: int = 5) -> None:
        """One line on stderr naming the files the class folders hold that no record lists (they stay)."""
        ids = self.manifest.get("class_ids") if isinstance(self.manifest.get("class_ids"), list) else []
        cids = dict.fromkeys([*(c for c in ids if isinstance(c, str)), *self.manifest["classes"]])
        found = [rel for cid in cids for rel in self.foreign(cid)]
        if found:
            more = f" and {len(found) - shown} more" if len(found) > shown else ""
            print(f"cao2: {len(found)} file(s) or folder(s) in the class folders of {self.out} are not cao2's (no "
                  f"class record lists them) and are left as they are: {', '.join(found[:shown])}{more}",
                  file=sys.stderr)

    def foreign(self, cid: str) -> list[str]:
        """What images/<cid> holds besides the files the class's record lists (paths in the run folder, a folder
        ending in /): a person's or a file browser's, kept and never a reason to redo the class. Without a record
        that lists files, cao2's own image names (0.png, ...) are an earlier attempt's, to be written again, not
        foreign; cao2's temporary names never are."""
        folder = self.out / "images" / cid
        if not folder.is_dir() or folder.is_symlink():
            return []
        files = (self.manifest["classes"].get(cid) or {}).get("files")
        ours = set(files["images"]) if files else None
        found = []
        for path, is_folder in self._entries(folder):
            if not is_folder and (TEMP_NAMES["class"].fullmatch(path.name) or (
                    path.name in ours if ours is not None else IMAGE_NAME.fullmatch(path.name))):
                continue
            found.append(f"images/{cid}/{path.name}" + ("/" if is_folder else ""))
        return found

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
        """Why the class's files are not those its record lists (None: they are). Only the listed files count:
        what else the folder holds is foreign and left alone."""
        expected = {f"images/{cid}/{name}": sha for name, sha in files.get("images", {}).items()}
        expected[f"latents/{cid}.safetensors"] = files.get("latents")
        if not all((self.out / rel).is_file() for rel in expected if rel.startswith("images/")):
            return f"images/{cid} does not hold the files its record lists"
        for rel, sha in expected.items():
            path = self.out / rel
            if not path.is_file() or stream_sha256(path) != sha:
                return f"{rel} is missing or differs from what this run wrote"
        return None

    def write_class(self, cid: str, pixels: torch.Tensor, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        """Write a class's images and latents and mark it complete; a write that fails (full disk, permissions)
        is one UserError, and the classes already complete stay so."""
        with interrupts_deferred():        # Ctrl-C lands after the class is whole, not halfway through it
            try:
                self._write_class(cid, pixels, tensors, entry)
            except (OSError, SafetensorError) as exc:
                raise UserError(f"cannot write class {cid} into {self.out} ({reason(exc)}); free disk space or fix "
                                "permissions, then rerun the same command to continue") from None

    def _write_class(self, cid: str, pixels: torch.Tensor, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        latents = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                       # one key: safetensors orders several metadata keys differently in every process
                       metadata={"cao2": json.dumps({"class": cid, "run_id": self.run_id}, sort_keys=True)})
        pngs = {f"{i}.png": png_bytes(arr) for i, arr in enumerate(to_uint8(pixels))}
        files = {"images": {name: hashlib.sha256(png).hexdigest() for name, png in sorted(pngs.items())},
                 "latents": hashlib.sha256(latents).hexdigest()}   # images in name order, as records always were
        final = self.out / "images" / cid
        if self.foreign(cid):
            self._write_beside_foreign(cid, final, pngs, latents, dict(entry, status="writing", files=files))
        else:
            self._write_staged(cid, final, pngs, latents, dict(entry, status="writing", files=files))
        self.set_status(cid, dict(entry, status="complete", files=files))

    def _write_staged(self, cid: str, final: Path, pngs: dict[str, bytes], latents: bytes, writing: dict) -> None:
        """The class's images into a new folder, renamed into place whole (replacing an earlier attempt's)."""
        staging = new_folder(final.parent, f".{cid}.")
        try:
            with locked_folder(staging):
                for name, png in pngs.items():
                    (staging / name).write_bytes(png)
                # listed before they appear: a kill in the next steps leaves only files a record lists
                self._write_record(cid, writing)
                atomic_write_bytes(self.out / "latents" / f"{cid}.safetensors", latents)
                swap_in(staging, final)
        except BaseException:
            remove_path(staging)
            raise

    def _write_beside_foreign(self, cid: str, final: Path, pngs: dict[str, bytes], latents: bytes,
                              writing: dict) -> None:
        """The class's images written one by one into its folder, which holds files cao2 did not write: swapping
        a new folder in would delete them. Each image replaces its name whole; the ``writing`` record lists them
        first, so a kill leaves a class that is redone, and only cao2's temporary names to sweep."""
        self._write_record(cid, writing)
        for name, png in pngs.items():
            atomic_write_bytes(final / name, png)
        atomic_write_bytes(self.out / "latents" / f"{cid}.safetensors", latents)

    def _write_record(self, cid: str, entry: dict) -> None:
        path = self.out / "records" / f"{cid}.json"
        try:
            atomic_write_bytes(path, (json.dumps(entry, indent=2) + "\n").encode())
        except OSError as exc:
            raise UserError(f"cannot write {path} ({reason(exc)}); free disk space or fix permissions, then rerun "
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
        found = [p for p in self.out.iterdir() if TEMP_NAMES["."].fullmatch(p.name)
                 or REPORT_STAGING.fullmatch(p.name)]      # a killed `cao2 report`'s staging folder
        for sub in ("latents", "records"):
            folder = self.out / sub
            found += [p for p in folder.iterdir() if TEMP_NAMES[sub].fullmatch(p.name)] if folder.is_dir() else []
        images = self.out / "images"
        for entry, is_folder in self._entries(images) if images.is_dir() and not images.is_symlink() else []:
            if STAGING.fullmatch(entry.name):
                found.append(entry)
            elif is_folder:         # a class folder: an image written beside foreign files
                found += [p for p in entry.iterdir() if TEMP_NAMES["class"].fullmatch(p.name)]
        removed = [p for p in found if abandoned(p)]
        for p in removed:
            with contextlib.suppress(OSError):
                remove_path(p)
        return removed

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.out / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())

    def save_manifest(self) -> None:
        """Rewrite ``manifest.json``; a failed write is one UserError (the records, and so every complete class,
        are kept: the same command writes it again)."""
        try:
            self._write_manifest()
        except OSError as exc:
            raise UserError(f"cannot write {self.out / MANIFEST} ({reason(exc)}); free disk space or fix "
                            "permissions, then rerun the same command (complete classes are kept)") from None

    def load_latents(self, cid: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "latents" / f"{cid}.safetensors"))

    def write_preview(self, rows: list[tuple[np.ndarray, np.ndarray]], pad: int = 2,
                      names: list[str] | None = None) -> Path:
        """One row per class (named by ``names``): the selected samples before CLO, a gap, the same after CLO."""
        canvas = preview_canvas(rows, pad, names)
        path = self.out / PREVIEW
        try:
            atomic_write_bytes(path, png_bytes(canvas))
        except OSError as exc:
            raise UserError(f"cannot write {path} ({reason(exc)}); free disk space or fix permissions, then rerun "
                            "the same command") from None
        return path


def sweep_reports(out: Path) -> list[Path]:
    """Remove the staging folders (``.report.<token>``) that killed ``cao2 report`` runs left in ``out``; one that
    a live report holds locked is left. What was removed."""
    removed = [p for p in Path(out).iterdir() if REPORT_STAGING.fullmatch(p.name) and abandoned(p)]
    for p in removed:
        with contextlib.suppress(OSError):
            remove_path(p)
    return removed
