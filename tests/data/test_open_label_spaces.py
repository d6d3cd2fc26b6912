"""Label spaces beyond MNIST and ImageNet: from a file of ids and names, or declared by a generator plugin; selection
with a classifier whose class list matches, or none."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from cao2core.method import engine
from cao2core.cli import main
from cao2core.generators.hookspecs import LatentSpec, hookimpl
from cao2core.data.labels import label_space
from cao2core.generators.host import Host

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "toy_generator"))
import cao2_toy  # noqa: E402

SHAPES = [("circle", "a round shape"), ("square", "a square"), ("triangle", "a triangle")]


def toy_variant(label_space_name, declared=None) -> types.ModuleType:
    m = types.ModuleType("shapes")
    for hook in [n for n in dir(cao2_toy) if n.startswith("cao2_")]:
        setattr(m, hook, getattr(cao2_toy, hook))
    m.cao2_latent_spec = hookimpl(lambda handle: LatentSpec((1, 32, 32), 10, (1, 999), 200, label_space_name))
    if declared is not None:
        m.cao2_label_spaces = hookimpl(lambda: declared)
    return m


@pytest.fixture
def install(monkeypatch):
    def put(module):
        real = Host

        def host():
            h = real()
            h.register(module, "shapes", kind="generator", version="1.0", distribution="cao2-shapes")
            return h
        monkeypatch.setattr(engine, "Host", host)
    return put


def shapes_classifier(path):
    model = timm.create_model("mnist_cnn", num_classes=3)
    save_file(model.state_dict(), str(path), metadata={"arch": "mnist_cnn", "num_classes": "3",
                                                       "classes": json.dumps([i for i, _ in SHAPES])})
    return path


def run(tmp_path, *extra):
    out = tmp_path / "out"
    return main(["run", "--generator", "shapes", "--ipc", "2", "--pool-factor", "2", "--condition", "class",
                 "--clo-iters", "2", "--out", str(out), "--no-progress", "--device", "cpu", *extra]), out


def test_a_file_of_ids_and_names_is_a_label_space_of_its_own(tmp_path):
    f = tmp_path / "shapes.txt"
    f.write_text("# my classes\ncircle a round shape\nsquare\n\ntriangle a triangle\n")
    space = label_space(str(f))
    assert space.ids == ("circle", "square", "triangle") and space.names == ("a round shape", "square", "a triangle")
    assert space.generator_labels == (0, 1, 2) and space.generator_space == str(f)


@pytest.mark.parametrize("select", ["none", "random"])
def test_a_file_label_space_with_a_generator_that_takes_any(install, tmp_path, select):
    install(toy_variant(None))
    f = tmp_path / "shapes.txt"
    f.write_text("\n".join(f"{i} {n}" for i, n in SHAPES) + "\n")
    rc, out = run(tmp_path, "--dataset", str(f), "--select", select)
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_ids"] == ["circle", "square", "triangle"] and m["class_names"][0] == "a round shape"
    assert m["generator_labels"] == [0, 1, 2] and m["generator_space"] == str(f)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["circle", "square", "triangle"]


def test_a_plugin_label_space_with_a_matching_classifier(install, tmp_path):
    install(toy_variant("shapes", {"shapes": SHAPES}))
    rc, out = run(tmp_path, "--classifier", str(shapes_classifier(tmp_path / "clf.safetensors")),
                  "--classes", "square,triangle")
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "shapes" and m["class_ids"] == ["square", "triangle"] and m["generator_labels"] == [1, 2]
    assert m["classes"]["square"]["kept"] == 2 and not m["classes"]["square"].get("reason")


def test_a_plugin_label_space_without_a_classifier_says_what_to_pass(install, tmp_path, capsys):
    install(toy_variant("shapes", {"shapes": SHAPES}))
    rc, out = run(tmp_path)
    err = capsys.readouterr().err
    assert rc != 0 and "label space shapes has no default selection classifier" in err and not out.exists()


def test_an_undeclared_label_space_is_one_line(install, tmp_path, capsys):
    install(toy_variant("cifar10"))
    rc, _ = run(tmp_path, "--select", "none")
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "label space 'cifar10', which neither cao2 nor the plugin" in err


def test_a_sweep_measures_a_plugin_label_space(install, monkeypatch, tmp_path):
    """cao2 sweep's measures resolve the label space as the run does: the generator's own spaces included."""
    import cao2core.generators.host
    install(toy_variant("shapes", {"shapes": SHAPES}))
    monkeypatch.setattr(cao2core.generators.host, "Host", engine.Host)      # the measures load the generator again
    out = tmp_path / "sweep"
    assert main(["sweep", "--generator", "shapes", "--ipc", "2", "--pool-factor", "2", "--condition", "class",
                 "--classifier", str(shapes_classifier(tmp_path / "clf.safetensors")), "--grid", "clo-iters=1,2",
                 "--no-eval", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert [p["measures"]["samples"] for p in report["points"]] == [6, 6]
