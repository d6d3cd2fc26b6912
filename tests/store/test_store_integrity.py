"""The output folder's integrity: --overwrite removes only what cao2 wrote, an interrupted creation or
replacement is recoverable, files get the umask's modes, class folders survive a concurrent writer, damaged JSON
and failed writes are one line each."""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import cao2core.store.records as store_module
from cao2core.store import files as store_files
from cao2core.store import layout as store_layout
from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.store import Store, to_uint8

CLASSES = ("0", "1")


def pixels(k: int, ipc: int = 2) -> torch.Tensor:
    return torch.linspace(-1, 1, ipc * 16).view(ipc, 1, 4, 4) * (k + 1) / 3


def write_run(out: Path, run_id: str = "A", classes=CLASSES, preview: bool = True) -> Store:
    """A finished run of tiny classes (2 images of 4x4 each) in ``out``."""
    store = Store(out, run_id, {"dataset": "mnist", "class_ids": list(classes)})
    store.check()
    store.open()
    for k, cid in enumerate(classes):
        store.write_class(cid, pixels(k), {"latents": torch.full((2, 4), float(k))}, {"label": k})
    store.finish([store.this_run], wait_s=0)
    if preview:
        img = to_uint8(pixels(0))
        store.write_preview([(img, img)])
    return store


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def add(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- 1. --overwrite removes only what cao2 wrote ------------------------------------------------------------


def test_overwrite_removes_every_file_of_the_other_run_and_its_debris(tmp_path):
    out = tmp_path / "o"
    write_run(out)
    for rel in ("eval/eval.json", "eval/eval.png", "eval/ablate.json", "eval/.eval.json.k2j4h5g6.tmp",
                "eval/sweep-measures.json", "eval/compare/compare.json", "eval/compare/compare.md",
                "eval/compare/distilled-hard/eval.json",
                "eval/compare/random-real-rded/compare.json", ".manifest.json.ab12cd34.tmp", ".preview.ab12cd34.png",
                ".preview.png.ab12cd34.tmp",
                "latents/.0.safetensors.ab12cd34.tmp", "records/.1.json.ab12cd34.tmp", "images/.1.ab12cd34/0.png",
                "images/.0.ab12cd34.old0/1.png"):
        add(out, rel)
    new = Store(out, "B", {"dataset": "mnist", "class_ids": ["5"]})
    new.check(overwrite=True)
    new.open()
    assert tree(out) == {"images": None, "latents": None, "records": None,
                         "manifest.json": (out / "manifest.json").read_bytes()}
    assert json.loads((out / "manifest.json").read_text())["run_id"] == "B"


def test_overwrite_removes_the_other_runs_report(tmp_path):
    """`cao2 report`'s page, its before-CLO and pool thumbnails, its pool pages and a report killed while being
    written are cao2's."""
    out = tmp_path / "o"
    write_run(out)
    for rel in ("report/index.html", "report/before/0/0.png", "report/before/0/1.png", "report/pool/0/7.png",
                "report/pool/0.html", ".report.ab12cd34/index.html",
                ".report.ab12cd34/before/0/0.png"):
        add(out, rel)
    new = Store(out, "B", {"dataset": "mnist", "class_ids": ["5"]})
    new.check(overwrite=True)
    new.open()
    assert tree(out) == {"images": None, "latents": None, "records": None,
                         "manifest.json": (out / "manifest.json").read_bytes()}


@pytest.mark.parametrize("rel", ["report/notes.txt", "report/before/0/mine.txt", "report/mine/0.png",
                                 "report/pool/0/mine.txt", "report/pool/notes.txt", "report/pool/0/1/0.png"])
def test_overwrite_refuses_what_a_person_put_in_a_report(tmp_path, rel):
    out = tmp_path / "o"
    write_run(out)
    add(out, "report/index.html")
    add(out, rel)
    with pytest.raises(UserError, match="which cao2 did not write"):
        Store(out, "B", {"dataset": "mnist", "class_ids": ["5"]}).check(overwrite=True)
    assert (out / rel).exists()


@pytest.mark.parametrize("rel,named", [
    ("notes.txt", None), ("images/mine/a.txt", "images/mine"), ("images/0/extra.png", None),
    ("images/0/sub/0.png", "images/0/sub"), ("images/stray.png", None), ("records/notes.txt", None),
    ("records/7.json", None), ("latents/other.bin", None), ("latents/7.safetensors", None),
    ("eval/notes.md", None), ("eval/compare/mine/eval.json", "eval/compare/mine"),
    ("images/.1.ab12cd34/notes.txt", None), ("images/mine/", "images/mine"),
])
def test_overwrite_refuses_anything_cao2_did_not_write_and_deletes_nothing(tmp_path, rel, named):
    out = tmp_path / "o"
    write_run(out)
    if rel.endswith("/"):
        (out / rel).mkdir()
    else:
        add(out, rel)
    before = tree(out)
    new = Store(out, "B", {"class_ids": ["5"]})
    for step in (lambda: new.check(overwrite=True), new.open):     # open checks again before it removes
        with pytest.raises(UserError) as exc:
            step()
        assert f"holds {named or rel}, which cao2 did not write" in one_line(exc)
        assert tree(out) == before


def test_overwrite_of_a_folder_cao2_did_not_write_is_refused(tiny_args, tmp_path, capsys):
    out = tmp_path / "out"
    add(out, "manifest.json", json.dumps({"name": "my photo dataset"}).encode())
    add(out, "images/cats/cat1.jpg", b"\xff\xd8 a cat")
    add(out, "records/notes.txt", b"where each photo was taken")
    before = tree(out)
    assert main(["run", *tiny_args, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a cao2 output folder" in err, err
    assert tree(out) == before


# --- 2. recoverable folders ----------------------------------------------------------------------------------


class Killed(BaseException):
    """kill -9: from the k-th file system change on, nothing more happens (not even cleanups)."""


def kill_at(monkeypatch, k: int) -> list[int]:
    calls = []
    for name in ("open", "mkdir", "replace", "rename", "unlink", "rmdir"):
        real = getattr(os, name)

        def changed(*args, _real=real, _name=name, **kwargs):
            if _name == "open" and not (args[1] if len(args) > 1 else kwargs["flags"]) & os.O_CREAT:
                return _real(*args, **kwargs)         # reading changes nothing
            calls.append(1)
            if len(calls) >= k:
                raise Killed
            return _real(*args, **kwargs)
        monkeypatch.setattr(os, name, changed)
    return calls


def killed_states(monkeypatch, tmp_path, prepare, act) -> list[Path]:
    """A copy of what a kill at each successive file system change of ``act`` leaves, until ``act`` completes."""
    states = []
    for k in range(1, 200):
        out = tmp_path / f"k{k}" / "o"
        prepare(out)
        with monkeypatch.context() as m:
            kill_at(m, k)
            try:
                act(out)
                return states
            except Killed:
                pass
        states.append(out)
    raise AssertionError("never completed")


def test_a_killed_creation_is_resumed_or_replaced(tmp_path, monkeypatch):
    header = {"class_ids": ["0"]}
    states = killed_states(monkeypatch, tmp_path, lambda out: out.parent.mkdir(),
                           lambda out: (Store(out, "A", header).check(), Store(out, "A", header).open()))
    assert len(states) >= 3
    for out in states:
        spare = out.parent / "spare"
        if out.exists():
            shutil.copytree(out, spare)
        same = Store(out, "A", header)
        same.check()                                    # the same command resumes
        same.open()
        assert json.loads((out / "manifest.json").read_text())["run_id"] == "A"
        other = Store(spare, "B", header)
        other.check(overwrite=True)                     # another run replaces it
        other.open()
        assert sorted(os.listdir(spare)) == ["images", "latents", "manifest.json", "records"]


def test_a_killed_overwrite_is_finished_by_the_same_command(tmp_path, monkeypatch):
    def replace(out):
        new = Store(out, "B", {"class_ids": ["5"]})
        new.check(overwrite=True)
        new.open()

    def prepare(out):
        write_run(out)
        add(out, "eval/eval.json")
    states = killed_states(monkeypatch, tmp_path, prepare, replace)
    assert len(states) >= 12
    for out in states:
        spare = out.parent / "spare"
        shutil.copytree(out, spare)
        replace(out)                                    # the same command finishes the job
        # (a resume leaves a temporary file a kill left: another process of the same run may be writing it)
        assert sorted(p for p in os.listdir(out) if not store_layout.TEMP_NAMES["."].fullmatch(p)) == [
            "images", "latents", "manifest.json", "records"]
        assert not [p for sub in ("images", "latents", "records") for p in (out / sub).iterdir()]
        owner = json.loads((spare / "manifest.json").read_text())["run_id"]
        old = Store(spare, "A", {"class_ids": list(CLASSES)})
        if owner == "A":
            old.check()                                 # still the old run's: its own command resumes it
        else:
            with pytest.raises(UserError, match="holds a run of other inputs"):
                old.check()


def test_a_kill_while_a_class_is_written_leaves_only_files_its_record_lists(tmp_path, monkeypatch):
    def prepare(out):
        write_run(out, classes=("0",), preview=False)

    def write(out):
        store = Store(out, "A", {"dataset": "mnist", "class_ids": ["0", "1"]})
        store.open()
        store.write_class("1", pixels(1), {"latents": torch.ones(2, 4)}, {"label": 1})
    states = killed_states(monkeypatch, tmp_path, prepare, write)
    assert len(states) >= 8
    for out in states:
        spare = out.parent / "spare"
        shutil.copytree(out, spare)
        resumed = Store(out, "A", {"dataset": "mnist", "class_ids": ["0", "1"]})
        resumed.check()
        resumed.open()
        resumed.load()
        assert resumed.is_complete("0")                 # what was complete stays complete
        resumed.write_class("1", pixels(1), {"latents": torch.ones(2, 4)}, {"label": 1})
        assert resumed.is_complete("1")
        monkeypatch.setattr(store_files, "DEBRIS_AGE_S", 0.0)
        resumed.finish([resumed.this_run], wait_s=0)
        assert not [p for p in out.rglob(".*")]         # what the kill left is swept when the run ends
        other = Store(spare, "B", {"class_ids": ["5"]})
        other.check(overwrite=True)                     # every file the kill left is listed: replaceable
        other.open()
        assert sorted(os.listdir(spare)) == ["images", "latents", "manifest.json", "records"]
        assert not [p for sub in ("images", "latents", "records") for p in (spare / sub).iterdir()]


@pytest.mark.skipif(store_files.fcntl is None, reason="no advisory locks on this platform")
def test_the_sweep_leaves_what_a_live_writer_holds(tmp_path, monkeypatch):
    out = tmp_path / "o"
    store = write_run(out, preview=False)
    monkeypatch.setattr(store_files, "DEBRIS_AGE_S", 0.0)
    dead = [out / "records" / ".0.json.abcd1234.tmp", out / "latents" / ".1.safetensors.abcd1234.tmp",
            out / ".manifest.json.abcd1234.tmp"]
    for p in dead:
        p.write_bytes(b"x")
    (out / "images" / ".1.abcd1234").mkdir()
    (out / ".report.abcd1234" / "before").mkdir(parents=True)      # a killed `cao2 report`'s staging folder
    live_file = out / "records" / ".1.json.live1234.tmp"
    live_file.write_bytes(b"x")
    live_folder = out / "images" / ".0.live1234"
    live_folder.mkdir()
    live_report = out / ".report.live1234"
    live_report.mkdir()
    held = [os.open(p, os.O_RDONLY) for p in (live_file, live_folder, live_report)]
    try:
        for fd in held:
            store_files.hold_lock(fd)
        removed = store.sweep_debris()
    finally:
        for fd in held:
            os.close(fd)
    assert sorted(removed) == sorted([*dead, out / "images" / ".1.abcd1234", out / ".report.abcd1234"])
    assert live_file.exists() and live_folder.is_dir() and live_report.is_dir()
    assert not any(p.exists() for p in dead) and not (out / ".report.abcd1234").exists()
    (out / "notes.txt").write_bytes(b"mine")             # names that are not cao2's are never touched
    assert sorted(store.sweep_debris()) == sorted([live_file, live_folder, live_report])    # released: writer died
    assert (out / "notes.txt").exists()
    monkeypatch.setattr(store_files, "DEBRIS_AGE_S", 3600.0)
    young = out / "records" / ".1.json.young123.tmp"
    young.write_bytes(b"x")
    assert store.sweep_debris() == [] and young.exists()    # too young to be sure its writer has locked it


def test_full_disk_before_the_manifest_is_written(tmp_path, monkeypatch):
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(store_module, "atomic_write_bytes", disk_full)
        with pytest.raises(UserError) as exc:
            Store(out, "A", {}).open()
    message = one_line(exc)
    assert "No space left on device" in message and str(out) in message and "rerun the same command" in message
    for run_id, overwrite in (("A", False), ("B", True)):
        Store(out, run_id, {}).check(overwrite)
    Store(out, "A", {}).open()
    assert json.loads((out / "manifest.json").read_text())["run_id"] == "A"


# --- 3. modes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_get_the_modes_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "o"
        write_run(out)
    finally:
        os.umask(previous)
    files = [out / "manifest.json", out / "preview.png", out / "records" / "0.json", out / "latents" / "1.safetensors",
             out / "images" / "0" / "0.png"]
    folders = [out, out / "images", out / "latents", out / "records", out / "images" / "1"]
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in files} == {str(p): 0o666 & ~umask for p in files}
    assert {str(p): stat.S_IMODE(p.stat().st_mode) for p in folders} == {str(p): 0o777 & ~umask for p in folders}


# --- 4. a concurrent writer of the same class ----------------------------------------------------------------


@pytest.mark.parametrize("race", ["puts its class in place first", "moves the old folder aside first"])
def test_a_class_written_by_two_processes_at_once(tmp_path, monkeypatch, race):
    out = tmp_path / "o"
    store = write_run(out, classes=("0",), preview=False)
    final = out / "images" / "0"
    real_rename, raced = os.rename, []

    def rename(src, dst, *args, _real=os.rename, **kwargs):
        if not raced and race == "puts its class in place first" and Path(dst) == final:
            shutil.rmtree(final)                # the other process: remove, then rename its complete folder in
            final.mkdir()
            (final / "0.png").write_bytes(b"the other process's image")
            raced.append(dst)
        elif not raced and race == "moves the old folder aside first" and Path(src) == final:
            real_rename(final, out / "images" / ".0.other.old0")
            shutil.rmtree(out / "images" / ".0.other.old0")
            raced.append(src)
        return _real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", functools.partial(rename, _real=os.replace))
    store.write_class("0", pixels(0), {"latents": torch.zeros(2, 4)}, {"label": 0})
    assert raced, "the race was not staged"
    store.redone.clear()
    assert store.is_complete("0"), store.redone
    assert sorted(os.listdir(out / "images")) == ["0"]      # nothing set aside is left behind


# --- 5. wrong-shaped JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize("record,why", [
    ("null", "is not a JSON object"), ("3", "is not a JSON object"), ("[]", "is not a JSON object"),
    ('{"status": 1}', "has no status string"), ('{"status": "complete"}', "lists no files"),
    ('{"status": "complete", "files": []}', "has no file list"),
    ('{"status": "complete", "files": {"images": [], "latents": "ab"}}', "has no list of images"),
    ('{"status": "complete", "files": {"images": {"../../x": "ab"}, "latents": "ab"}}', "has no list of images"),
])
def test_a_wrong_shaped_record_means_the_class_is_redone(tmp_path, record, why):
    out = tmp_path / "o"
    write_run(out)
    (out / "records" / "0.json").write_text(record)
    store = Store(out, "A", {"dataset": "mnist", "class_ids": list(CLASSES)})
    store.check()
    store.open()
    assert store.redone == {"0": f"its record {why}"}
    assert not store.recorded_complete("0") and not store.is_complete("0") and store.is_complete("1")
    store.write_class("0", pixels(0), {"latents": torch.zeros(2, 4)}, {"label": 0})
    assert store.is_complete("0")


def test_a_wrong_shaped_record_is_redone_by_the_cli(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args]) == 0
    record = tmp_path / "out" / "records" / "0.json"
    good = record.read_bytes()
    record.write_text("null")
    capsys.readouterr()
    assert main(["run", *tiny_args]) == 0
    assert "class 0 will be redone: its record is not a JSON object" in capsys.readouterr().err
    assert json.loads(record.read_bytes())["files"] == json.loads(good)["files"]


@pytest.mark.parametrize("manifest", ["null", "3", "[]", '"text"', "{not json", '{"format": "cao2-run/1"}',
                                      '{"format": "cao2-run/1", "run_id": 5}'])
def test_a_wrong_shaped_manifest_is_one_line(tmp_path, manifest):
    out = tmp_path / "o"
    write_run(out)
    (out / "manifest.json").write_text(manifest)
    before = tree(out)
    for run_id in ("A", "B"):
        for overwrite in (False, True):
            with pytest.raises(UserError) as exc:
                Store(out, run_id, {}).check(overwrite)
            assert f"{out / 'manifest.json'} is damaged" in one_line(exc) and "choose another --out" in str(exc.value)
    assert tree(out) == before


def test_a_wrong_shaped_manifest_is_one_line_in_the_cli(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args]) == 0
    (tmp_path / "out" / "manifest.json").write_text("[]")
    assert main(["run", *tiny_args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json is damaged" in err, err


@pytest.mark.parametrize("manifest", [
    "null", "[]", '{"dataset": "mnist", "class_ids": "0"}', '{"dataset": "mnist", "class_ids": [0]}',
    '{"dataset": "mnist", "class_ids": ["0"], "classes": []}', '{"dataset": 7, "class_ids": ["0"]}',
])
def test_eval_refuses_a_wrong_shaped_manifest(tmp_path, manifest):
    from cao2core.scoring.data import open_distilled
    add(tmp_path / "run", "manifest.json", manifest.encode())
    with pytest.raises(UserError) as exc:
        open_distilled(str(tmp_path / "run"), None, None)
    assert "is unreadable or not a cao2 run manifest" in one_line(exc)


def test_eval_refuses_a_record_of_the_wrong_shape_as_unfinished(tmp_path):
    from cao2core.scoring.data import open_distilled
    add(tmp_path / "run", "manifest.json", json.dumps(
        {"dataset": "mnist", "class_ids": ["0", "1"], "classes": {"0": {"status": "complete"}, "1": None}}).encode())
    with pytest.raises(UserError) as exc:
        open_distilled(str(tmp_path / "run"), None, None)
    assert "unfinished cao2 run (1 of 2 classes not complete, first '1')" in one_line(exc)


# --- 6. full disk and other write failures --------------------------------------------------------------------


def test_full_disk_while_the_final_manifest_is_written(tmp_path, monkeypatch):
    out = tmp_path / "o"
    store = write_run(out, preview=False)
    before = tree(out)
    with monkeypatch.context() as m:
        m.setattr(store_module, "atomic_write_bytes", disk_full)
        with pytest.raises(UserError) as exc:
            store.finish([store.this_run], wait_s=0)
    message = one_line(exc)
    assert f"cannot write {out / 'manifest.json'} (No space left on device)" in message
    assert "rerun the same command" in message
    assert tree(out) == before                          # nothing complete is lost
    again = Store(out, "A", {"dataset": "mnist", "class_ids": list(CLASSES)})
    again.check()
    again.open()
    again.load()
    assert all(again.is_complete(c) for c in CLASSES)


@pytest.mark.parametrize("failure", ["safetensors", "latents rename"])
def test_a_failed_class_write_is_one_line_and_keeps_the_complete_classes(tmp_path, monkeypatch, failure):
    out = tmp_path / "o"
    store = write_run(out, classes=("0",), preview=False)
    if failure == "safetensors":
        def save(tensors, metadata=None):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        monkeypatch.setattr(store_module, "save", save)
    else:
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith(".safetensors"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError) as exc:
        store.write_class("1", pixels(1), {"latents": torch.ones(2, 4)}, {"label": 1})
    message = one_line(exc)
    assert message.startswith(f"cannot write class 1 into {out} (") and "rerun the same command" in message
    assert ("StorageFull" if failure == "safetensors" else "No space left on device") in message
    assert not [p for p in out.rglob(".*")]             # no temporary file is left
    monkeypatch.undo()
    again = Store(out, "A", {"dataset": "mnist", "class_ids": ["0", "1"]})
    again.check()
    again.open()
    again.load()
    assert again.is_complete("0") and not again.is_complete("1")


def test_a_safetensors_error_mid_run_is_one_line(tiny_args, tmp_path, capsys, monkeypatch):
    real, calls = store_module.save, []

    def fails_second(tensors, metadata=None):
        calls.append(tensors)
        if len(calls) > 1:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, metadata=metadata)
    monkeypatch.setattr(store_module, "save", fails_second)
    assert main(["run", *tiny_args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write class 3" in err and "rerun the same command" in err, err
    assert sorted(os.listdir(tmp_path / "out" / "images")) == ["0"]
    monkeypatch.setattr(store_module, "save", real)
    assert main(["run", *tiny_args]) == 0
    assert "(1 already complete)" in capsys.readouterr().out


def test_every_file_cao2s_evaluations_write_into_a_run_is_known_to_overwrite():
    """--overwrite refuses a run folder holding unknown files: each evaluation command's names must be listed."""
    from cao2core.studies import ablate, sweep
    from cao2core.studies import compare
    from cao2core.scoring import report
    written = {report.REPORT, report.PLOT, ablate.MARKER, sweep.MEASURES, compare.REPORT, compare.TABLE,
               compare.MARKER}
    assert written <= set(store_layout.eval_files())


def test_eval_reports_get_the_umasks_mode(tmp_path):
    import os
    from cao2core.store.files import write_files
    old = os.umask(0o022)
    try:
        [path] = write_files(tmp_path / "eval", {"eval.json": b"{}"})
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


# --- 6. files a person put in the run folder, and folders that lead out of it ----------------------------------


HEADER = {"dataset": "mnist", "class_ids": list(CLASSES)}


def foreign_files(out: Path) -> None:
    """What a person, a file browser or an image viewer puts in finished class folders."""
    add(out, "images/0/mine.png", (out / "images" / "0" / "0.png").read_bytes())
    add(out, "images/0/.DS_Store", b"\0\0\0\1Bud1")
    add(out, "images/0/.thumbs/0.jpg", b"\xff\xd8 a thumbnail")
    add(out, "images/1/notes.txt", b"class 1 looks odd")


def test_files_no_record_lists_are_kept_and_no_reason_to_redo(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    write_run(out)
    foreign_files(out)
    before = tree(out)
    capsys.readouterr()
    store = Store(out, "A", HEADER)
    store.check()
    store.open()
    store.load()
    assert store.is_complete("0") and store.is_complete("1") and store.redone == {}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err                                   # said once, though the records were read twice
    assert "4 file(s) or folder(s) in the class folders of" in err[0] and "left as they are" in err[0], err
    for rel in ("images/0/.DS_Store", "images/0/.thumbs/", "images/0/mine.png", "images/1/notes.txt"):
        assert rel in err[0], err
    monkeypatch.setattr(store_files, "DEBRIS_AGE_S", 0.0)
    store.finish([store.this_run], wait_s=0)
    assert {k: v for k, v in tree(out).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"}


def test_a_class_written_again_keeps_the_files_no_record_lists(tmp_path, monkeypatch):
    out = tmp_path / "o"
    write_run(out)
    foreign_files(out)
    (out / "records" / "1.json").unlink()                       # class 1 unfinished: written again
    (out / "images" / "0" / "1.png").write_bytes(b"damaged")   # class 0's listed file differs: redone
    mine = {rel: data for rel, data in tree(out).items() if "mine" in rel or "notes" in rel or "thumbs" in rel
            or "DS_Store" in rel}
    store = Store(out, "A", HEADER)
    store.check()
    store.open()
    store.load()
    assert not store.is_complete("0") and not store.recorded_complete("1")
    assert store.redone == {"0": "images/0/1.png is missing or differs from what this run wrote"}
    for k, cid in enumerate(CLASSES):
        store.write_class(cid, pixels(k), {"latents": torch.full((2, 4), float(k))}, {"label": k})
    store.redone.clear()
    assert store.is_complete("0") and store.is_complete("1"), store.redone
    monkeypatch.setattr(store_files, "DEBRIS_AGE_S", 0.0)
    store.finish([store.this_run], wait_s=0)
    assert {rel: data for rel, data in tree(out).items() if rel in mine} == mine
    fresh = tree(write_run(tmp_path / "fresh").out)             # the class files are those of a straight run
    assert {k: v for k, v in tree(out).items() if k.startswith(("images/", "latents/")) and k not in mine} == {
        k: v for k, v in fresh.items() if k.startswith(("images/", "latents/"))}


def test_a_kill_while_a_class_is_written_beside_a_persons_files(tmp_path, monkeypatch):
    header = {"dataset": "mnist", "class_ids": ["0", "1"]}

    def prepare(out):
        write_run(out, preview=False)
        (out / "records" / "1.json").unlink()
        add(out, "images/1/mine.txt", b"precious")

    def write(out):
        store = Store(out, "A", header)
        store.open()
        store.write_class("1", pixels(1), {"latents": torch.ones(2, 4)}, {"label": 1})
    states = killed_states(monkeypatch, tmp_path, prepare, write)
    assert len(states) >= 6
    for out in states:
        assert (out / "images" / "1" / "mine.txt").read_bytes() == b"precious"
        resumed = Store(out, "A", header)
        resumed.check()
        resumed.open()
        resumed.load()
        assert resumed.is_complete("0")
        resumed.write_class("1", pixels(1), {"latents": torch.ones(2, 4)}, {"label": 1})
        assert resumed.is_complete("1")
        monkeypatch.setattr(store_files, "DEBRIS_AGE_S", 0.0)
        resumed.finish([resumed.this_run], wait_s=0)
        assert not [p for p in out.rglob(".*")]                 # what the kill left is swept when the run ends
        assert sorted(os.listdir(out / "images" / "1")) == ["0.png", "1.png", "mine.txt"]
        assert (out / "images" / "1" / "mine.txt").read_bytes() == b"precious"


@pytest.mark.parametrize("rel", ["images", "latents", "records", "eval", "images/0"])
def test_a_symlinked_folder_of_the_layout_is_refused_before_anything_is_written(tmp_path, rel):
    out = tmp_path / "o"
    write_run(out)
    theirs = tmp_path / "elsewhere"
    if (out / rel).exists():
        shutil.move(out / rel, theirs)
    else:
        add(theirs, "0.safetensors", b"the user's own file")
    (out / rel).symlink_to(theirs)
    before, before_theirs = tree(out), tree(theirs)
    store = Store(out, "A", HEADER)
    for step in (store.check, store.open):
        with pytest.raises(UserError) as exc:
            step()
        message = one_line(exc)
        assert f"{out / rel} is a symbolic link (to {theirs})" in message and "replace" in message, message
    assert tree(out) == before and tree(theirs) == before_theirs


def test_a_file_where_a_class_folder_goes_is_refused(tmp_path):
    out = tmp_path / "o"
    write_run(out)
    shutil.rmtree(out / "images" / "1")
    add(out, "images/1", b"a file named like the class")
    with pytest.raises(UserError) as exc:
        Store(out, "A", HEADER).check()
    assert f"{out / 'images' / '1'} is a file where cao2 keeps its images/1 folder" in one_line(exc)
    assert (out / "images" / "1").read_bytes() == b"a file named like the class"


def test_a_rerun_keeps_what_a_person_put_in_the_output(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args]) == 0
    out = tmp_path / "out"
    add(out, "images/0/mine.png", (out / "images" / "0" / "0.png").read_bytes())
    add(out, "images/0/.DS_Store", b"\0\0\0\1Bud1")
    add(out, "images/0/.thumbs/0.jpg", b"\xff\xd8 a thumbnail")
    (out / "records" / "3.json").unlink()
    add(out, "images/3/mine.txt", b"precious")
    before = tree(out)
    capsys.readouterr()
    assert main(["run", *tiny_args]) == 0
    captured = capsys.readouterr()
    assert "class 0 will be redone" not in captured.err and "(1 already complete)" in captured.out
    [said] = [line for line in captured.err.splitlines() if "no class record lists them" in line]
    assert all(rel in said for rel in ("images/0/mine.png", "images/0/.DS_Store", "images/0/.thumbs/",
                                       "images/3/mine.txt")), said
    after = tree(out)
    for rel in ("images/0/mine.png", "images/0/.DS_Store", "images/0/.thumbs/0.jpg", "images/3/mine.txt"):
        assert after[rel] == before[rel]
    assert json.loads((out / "records" / "3.json").read_text())["status"] == "complete"
    assert sorted(os.listdir(out / "images" / "3")) == ["0.png", "1.png", "mine.txt"]
    assert after["images/3/0.png"] == before["images/3/0.png"] and after["latents/3.safetensors"] == before[
        "latents/3.safetensors"]


def test_a_symlinked_latents_folder_is_refused_by_the_cli(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args]) == 0
    out, theirs = tmp_path / "out", tmp_path / "my-latents"
    shutil.move(out / "latents", theirs)
    (theirs / "0.safetensors").write_bytes(b"the user's own work")
    (out / "latents").symlink_to(theirs)
    before = tree(theirs)
    capsys.readouterr()
    assert main(["run", *tiny_args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out / 'latents'} is a symbolic link" in err, err
    assert "cao2 writes only inside its output folder" in err, err
    assert tree(theirs) == before
