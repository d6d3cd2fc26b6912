"""A run's identity is everything that determines its output: a resume with any of it changed is refused in one
line naming the change, before anything is written."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cao2core.generators import weights
from cao2core.cli import main
from conftest import make_world


def digest_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, tiny_world):
    w = tmp_path / "world"
    shutil.copytree(tiny_world, w)
    return w


def args(world, classifier, out, *extra):
    return ["run", "--model", str(world), "--classifier", str(classifier), "--classes", "0,3", "--ipc", "2",
            "--pool-factor", "2", "--clo-iters", "2", "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def test_manifest_records_the_identity(world, tiny_classifier, tmp_path):
    out = tmp_path / "out"
    assert main(args(world, tiny_classifier, out)) == 0
    ident = json.loads((out / "manifest.json").read_text())["identity"]
    assert ident["generator"] == {"name": "dit", "distribution": "cao2", "version": "0.1.0"}
    assert set(ident["files"]) == {"generator.transformer", "generator.vae", "classifier"}
    assert ident["files"]["classifier"] == weights.file_sha256(tiny_classifier) and ident["cao2"] == "0.1.0"
    assert ident["config"]["seed"] == 0 and ident["plugins"] == {}


def test_a_replaced_model_file_is_refused_and_nothing_changes(world, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(world, tiny_classifier, out)) == 0
    (out / "records" / "3.json").unlink()           # as if interrupted after class 0
    before = digest_tree(out)
    make_world(tmp_path / "other", seed=5)
    shutil.copy(tmp_path / "other" / "transformer" / "diffusion_pytorch_model.safetensors",
                world / "transformer" / "diffusion_pytorch_model.safetensors")
    assert main(args(world, tiny_classifier, out)) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "files.generator.transformer was " in err, err
    assert digest_tree(out) == before


def test_a_changed_plugin_version_is_refused(world, tiny_classifier, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(args(world, tiny_classifier, out)) == 0
    import cao2core.generators.host as plugins
    monkeypatch.setattr(plugins, "_dist_version", lambda ep: "0.2.0")
    assert main(args(world, tiny_classifier, out)) != 0
    assert 'generator.version was "0.1.0", now "0.2.0"' in capsys.readouterr().err


def test_a_changed_class_accuracy_file_is_refused(world, tiny_classifier, tmp_path, capsys):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({str(i): 0.9 for i in range(10)}))
    out = tmp_path / "out"
    extra = ("--condition", "auto", "--class-accuracy", str(acc))
    assert main(args(world, tiny_classifier, out, *extra)) == 0
    acc.write_text(json.dumps({str(i): 0.1 for i in range(10)}))
    assert main(args(world, tiny_classifier, out, *extra)) != 0
    assert "files.class_accuracy was" in capsys.readouterr().err


def test_hashes_are_cached_by_path_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setenv("CAO2_HASH_CACHE", str(tmp_path / "cache.json"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    first = weights.file_sha256(f)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(weights.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert weights.file_sha256(f) == first and calls == []            # from the cache
    f.write_bytes(b"b" * 1001)
    assert weights.file_sha256(f) == real(b"b" * 1001).hexdigest() and calls == [1]
