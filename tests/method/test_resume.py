"""Reliability: torchrun sharding, kill -9 and resume, atomic class folders, faults in the output folder."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cao2core.cli import main

CLASSES = "0,3,5,8"


def base_args(tiny_world, tiny_classifier, out, *extra):
    # enough work per class (sampler steps, CLO iterations) that a kill can land inside a class; batch size 4
    # packs two classes of IPC 2 into each CLO chunk: groups {0, 3} and {5, 8}, one per rank on 2 ranks
    return ["--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", CLASSES, "--ipc", "2",
            "--pool-factor", "2", "--sample-steps", "40", "--clo-iters", "60", "--batch-size", "4", "--out",
            str(out), "--no-progress", "--device", "cpu", *extra]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file a run writes, except the manifest's run-dependent fields (command line, timings)."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "manifest.json" and not p.parent.name == "records"}
    files["latents"] = b"".join(json.dumps({k: v.tolist() for k, v in load_file(str(p)).items()}).encode()
                                for p in sorted((out / "latents").glob("*.safetensors")))
    m = json.loads((out / "manifest.json").read_text())
    files["manifest"] = json.dumps({"run_id": m["run_id"], "class_ids": m["class_ids"],
                                    "files": {c: e["files"] for c, e in m["classes"].items()}}, sort_keys=True).encode()
    return files


@pytest.fixture(scope="module")
def straight(tiny_world, tiny_classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    assert main(["run", *base_args(tiny_world, tiny_classifier, out)]) == 0
    return snapshot(out)


def cli(*args, env_extra=None):
    # the same CPU threads per process as this one (which made the straight run): float results are
    # bit-identical for a given thread count, and torchrun would otherwise give each rank one thread
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), **(env_extra or {}))
    return [sys.executable, "-m", "cao2core.cli", *args], env


def test_two_ranks_write_the_same_files_as_one(tiny_world, tiny_classifier, tmp_path, straight):
    out = tmp_path / "ranks"
    cmd, env = cli("run", *base_args(tiny_world, tiny_classifier, out))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot(out) == straight
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["classes"]) == sorted(CLASSES.split(","))
    assert proc.stdout.count("distilled 4 classes") == 1          # rank 0 reports for all ranks
    records = {c: json.loads((out / "records" / f"{c}.json").read_text()) for c in CLASSES.split(",")}
    assert {c: r["rank"] for c, r in records.items()} == {"0": 0, "3": 0, "5": 1, "8": 1}

    # a resume deals out the groups left to do afresh: rank 1's group, the only one left, goes to rank 0
    for c in ("5", "8"):
        (out / "records" / f"{c}.json").unlink()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("distilled 2 classes (2 already complete)") == 1
    assert all(json.loads((out / "records" / f"{c}.json").read_text())["rank"] == 0 for c in ("5", "8"))
    assert snapshot(out) == straight


def _complete_classes_are_whole(out: Path) -> None:
    """Whatever a kill left: every visible class folder is whole, every latents file loads."""
    for folder in (out / "images").iterdir() if (out / "images").is_dir() else []:
        if folder.name.startswith("."):
            continue
        pngs = sorted(folder.iterdir())
        assert [p.name for p in pngs] == ["0.png", "1.png"], folder
        for p in pngs:
            Image.open(p).load()
    for p in (out / "latents").glob("*.safetensors") if (out / "latents").is_dir() else []:
        load_file(str(p))


def test_killed_runs_resume_to_identical_files(tiny_world, tiny_classifier, tmp_path, straight):
    """SIGKILL a little after a class completes (so inside the next group's sampling, CLO or writing), check
    what is visible after every kill, then rerun: the files equal a straight run's."""
    import random
    out = tmp_path / "killed"
    cmd, env = cli("run", *base_args(tiny_world, tiny_classifier, out))
    rng = random.Random(0)
    records = lambda: len(list((out / "records").glob("*.json"))) if (out / "records").is_dir() else 0  # noqa: E731
    kills = 0
    while records() < 3:
        start = records()
        # niced, so this watcher sees each record at once even when the run's threads fill every core
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=lambda: os.nice(10))
        while records() == start and proc.poll() is None:
            time.sleep(0.01)
        # the first kill lands at once, so at least two land however fast the machine; the later ones within
        # a group's time (about 1 s on 2 slow cores, a fifth of that on a fast machine)
        time.sleep(rng.uniform(0.0, 0.3) if kills else 0.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        _complete_classes_are_whole(out)
    assert kills >= 2, f"only {kills} kill(s) landed before {records()} classes were complete"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert snapshot(out) == straight
    assert not [p for p in out.rglob(".*")]                     # no temporary file survives the rerun


def test_corrupt_file_in_output_is_redone(tiny_world, tiny_classifier, tmp_path, straight, capsys):
    out = tmp_path / "o"
    args = base_args(tiny_world, tiny_classifier, out)
    assert main(["run", *args]) == 0
    (out / "images" / "3" / "1.png").write_bytes(b"\x89PNG truncated")
    (out / "latents" / "5.safetensors").write_bytes(b"\0" * 10)
    capsys.readouterr()
    assert main(["run", *args]) == 0
    err = capsys.readouterr().err
    assert "class 3 will be redone" in err and "class 5 will be redone" in err
    assert snapshot(out) == straight


def test_other_run_needs_overwrite(tiny_world, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", *base_args(tiny_world, tiny_classifier, out, "--classes", "0")]) == 0
    before = (out / "manifest.json").read_text()
    assert main(["run", *base_args(tiny_world, tiny_classifier, out, "--classes", "0", "--seed", "9")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "manifest.json").read_text() == before
    assert main(["run", *base_args(tiny_world, tiny_classifier, out, "--classes", "1", "--seed", "9",
                                   "--overwrite")]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["classes"]) == ["1"] and not (out / "images" / "0").exists()


def test_disk_full_keeps_what_was_written(tiny_world, tiny_classifier, tmp_path, capsys, monkeypatch):
    import cao2core.store.records as store
    out = tmp_path / "o"
    real, calls = store.atomic_write_bytes, []

    def full_after_one(path, data):
        if path.suffix == ".safetensors":
            calls.append(path)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(store, "atomic_write_bytes", full_after_one)
    assert main(["run", *base_args(tiny_world, tiny_classifier, out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "rerun the same command" in err
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0"]          # the first class is kept
    assert not [p for p in out.rglob(".*")]
    monkeypatch.setattr(store, "atomic_write_bytes", real)
    assert main(["run", *base_args(tiny_world, tiny_classifier, out)]) == 0
    assert "(1 already complete)" in capsys.readouterr().out


def test_unwritable_output_is_refused(tiny_world, tiny_classifier, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert main(["run", *base_args(tiny_world, tiny_classifier, tmp_path / "o")]) == 2
    assert "cannot write to" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rank_0_refuses_a_manifest_when_it_cannot_see_the_other_ranks_files(tmp_path):
    # several nodes whose --out is not one shared folder: rank 1's record exists only on its own node
    from cao2core.errors import UserError
    from cao2core.store import Store
    store = Store(tmp_path / "o", "rid", {}, rank=0, world_size=2)
    store.open()
    mine = {"0": {"status": "complete", "rank": 0}}
    theirs = {"5": {"status": "complete", "rank": 1}}
    store.manifest["classes"].update(mine)
    with pytest.raises(UserError, match=r"rank 0 cannot see .*records/5\.json.*file system every node shares"):
        store.finish([mine, theirs], wait_s=0.2)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["classes"] == {}    # not rewritten
    # on a shared folder it appears (a network file system may list it late): the manifest takes what rank 1 sent
    (tmp_path / "o" / "records" / "5.json").write_text(json.dumps({"status": "failed"}))
    store.finish([mine, theirs], wait_s=0.2)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["classes"] == {**mine, **theirs}


def test_ctrl_c_leaves_a_resumable_state(tiny_world, tiny_classifier, tmp_path, straight):
    out = tmp_path / "interrupted"
    cmd, env = cli("run", *base_args(tiny_world, tiny_classifier, out))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not ((out / "records").is_dir() and list((out / "records").glob("*.json"))) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt landed")
    assert proc.returncode == 130 and "interrupted; rerun the same command to continue" in err
    _complete_classes_are_whole(out)
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0
    assert snapshot(out) == straight


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_rank_that_dies_stops_the_run_and_the_rerun_resumes(tiny_world, tiny_classifier, tmp_path, straight):
    out = tmp_path / "died"
    cmd, env = cli("run", *base_args(tiny_world, tiny_classifier, out))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:]]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.nice(10))       # the watcher below stays prompt
    deadline = time.time() + 120
    while (victim := _rank_pid(launcher.pid, 1)) is None and time.time() < deadline:
        time.sleep(0.05)
    assert victim is not None, "rank 1 never started"
    while not (out / "records").is_dir() and time.time() < deadline:
        time.sleep(0.01)              # rank 0 opens the output once every rank has loaded: the work begins
    os.kill(victim, signal.SIGKILL)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, "torchrun must fail when a rank dies"
    assert not (out / "records" / "5.json").exists() or not (out / "records" / "8.json").exists()
    _complete_classes_are_whole(out)
    rerun = subprocess.run(cli("run", *base_args(tiny_world, tiny_classifier, out))[0], env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert snapshot(out) == straight


def test_a_class_redone_beside_a_persons_files_keeps_them(tiny_world, tiny_classifier, tmp_path, straight, capsys):
    """An unfinished class whose folder holds a person's file is written beside it: the file stays, and the
    class's files are a straight run's."""
    out = tmp_path / "o"
    args = base_args(tiny_world, tiny_classifier, out)
    assert main(["run", *args]) == 0
    (out / "records" / "5.json").unlink()
    (out / "images" / "5" / "1.png").unlink()
    (out / "images" / "5" / "mine.txt").write_bytes(b"precious")
    (out / "images" / "8" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    capsys.readouterr()
    assert main(["run", *args]) == 0
    captured = capsys.readouterr()
    assert "1 classes (3 already complete)" in captured.out and "class 8 will be redone" not in captured.err
    assert "images/5/mine.txt, images/8/.DS_Store" in captured.err
    assert (out / "images" / "5" / "mine.txt").read_bytes() == b"precious"
    assert (out / "images" / "8" / ".DS_Store").exists()
    (out / "images" / "5" / "mine.txt").unlink()
    (out / "images" / "8" / ".DS_Store").unlink()
    assert snapshot(out) == straight
