"""`cao2 refine`: CaO2 as a post-processing step on an existing folder of images."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cao2core.method import engine
from cao2core.data import mnist
from cao2core.cli import config_from_args, build_parser, main
from cao2core.errors import UserError
from cao2core.data.labels import label_space
from cao2core.generators.host import Host
from cao2core.method.pools import class_files
from digits import write_digits



def args_for(tiny_world, tiny_classifier, images, out, *extra):
    return ["--images", str(images), "--model", str(tiny_world), "--classifier", str(tiny_classifier),
            "--clo-iters", "3", "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def fails(argv, capsys, match):
    assert main(["refine", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_refine_selects_optimizes_and_records_the_source(tiny_world, tiny_classifier, tmp_path, capsys):
    images = write_digits(tmp_path / "imgs", {"2": 5, "7": 3})
    out = tmp_path / "out"
    assert main(["refine", *args_for(tiny_world, tiny_classifier, images, out, "--ipc", "4")]) == 0
    assert "refined 2 classes" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "images" / "2").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert len(list((out / "images" / "7").iterdir())) == 3            # fewer than --ipc: all kept
    t = load_file(str(out / "latents" / "2.safetensors"))
    assert t["latents"].shape == (4, 4, 8, 8) and not torch.equal(t["latents"], t["latents_init"])
    assert sorted(t["pool_index"].tolist()) != [] and set(t["pool_index"].tolist()) <= set(range(5))
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_ids"] == ["2", "7"] and m["source"]["files"] == {"2": 5, "7": 3}
    assert len(m["source"]["sha256"]) == 64 and m["classes"]["2"]["pool"] == 5 and m["classes"]["2"]["kept"] == 4
    # the given images were judged: their pool record, every image with its score, one of the five rejected
    assert m["classes"]["2"]["pool_record"]["select"] == "confidence" and len(t["pool_score"]) == 5
    assert int((t["pool_rank"] >= 0).sum()) == 4 and t["pool_thumbs"].shape == (5, 32, 32, 1)
    # same command: nothing to redo; a changed source folder is another run
    assert main(["refine", *args_for(tiny_world, tiny_classifier, images, out, "--ipc", "4")]) == 0
    assert "(2 already complete)" in capsys.readouterr().out
    write_digits(images, {"2": 1}, first=50)                            # overwrite 0.png with another digit
    fails(args_for(tiny_world, tiny_classifier, images, out, "--ipc", "4"), capsys, "holds a run of other inputs")


def test_refine_keeps_every_image_and_is_deterministic(tiny_world, tiny_classifier, tmp_path):
    images = write_digits(tmp_path / "imgs", {"4": 3})
    outs = []
    for name in ("a", "b"):
        outs.append(tmp_path / name)
        assert main(["refine", *args_for(tiny_world, tiny_classifier, images, outs[-1], "--select", "none",
                                         "--ipc", "all")]) == 0
    ta, tb = (load_file(str(o / "latents" / "4.safetensors")) for o in outs)
    assert ta["pool_index"].tolist() == [0, 1, 2] and torch.equal(ta["latents"], tb["latents"])
    assert "pool_score" not in ta            # --select none judged nothing: no pool record
    for i in range(3):
        assert np.array_equal(*(np.asarray(Image.open(o / "images" / "4" / f"{i}.png")) for o in outs))


def test_refine_round_trip_on_the_mnist_world(tmp_path):
    """Without CLO and selection, refine is encode + decode: the world's VAE keeps the digits (MSE < 0.05)."""
    images = write_digits(tmp_path / "imgs", {"3": 4, "8": 4})
    out = tmp_path / "out"
    assert main(["refine", "--images", str(images), "--select", "none", "--ipc", "all", "--clo-iters", "0",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    for cid in ("3", "8"):
        for i in range(4):
            a = np.asarray(Image.open(images / cid / f"{i}.png"), dtype=np.float32) / 127.5 - 1
            b = np.asarray(Image.open(out / "images" / cid / f"{i}.png"), dtype=np.float32) / 127.5 - 1
            assert ((a - b) ** 2).mean() < 0.05


def test_wnid_and_class_name_folders_map_to_the_label_space(tmp_path):
    nette = label_space("nette")
    for name in ("n01440764", "English springer", "cassette_player"):     # a wnid, a name, a synonym spelling
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    files = class_files(tmp_path, nette)
    assert sorted(files) == sorted(["n01440764", "n02102040", "n02979186"])
    (tmp_path / "goldfish").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "goldfish" / "a.png")
    with pytest.raises(UserError, match="'goldfish'|goldfish maps to no class of dataset nette"):
        class_files(tmp_path, nette)


@pytest.mark.parametrize("case,match", [
    ("text file", "is not an image file"),
    ("corrupt png", "cannot read"),
    ("empty class", "has no images"),
    ("tiny image", "smaller than the minimum short side 16 px"),
    ("unknown folder", "maps to no class of dataset mnist"),
])
def test_bad_image_folders_are_refused(tiny_world, tiny_classifier, tmp_path, capsys, case, match):
    images = write_digits(tmp_path / "imgs", {"1": 2})
    if case == "text file":
        (images / "1" / "notes.txt").write_text("hello")
    elif case == "corrupt png":
        (images / "1" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    elif case == "empty class":
        (images / "5").mkdir()
    elif case == "tiny image":
        write_digits(images, {"2": 1}, size=12)
    else:
        (images / "eleven").mkdir()
        Image.new("L", (32, 32)).save(images / "eleven" / "0.png")
    out = tmp_path / "out"
    fails(args_for(tiny_world, tiny_classifier, images, out), capsys, match)
    assert not out.exists()


def test_refine_options_are_checked(tiny_world, tiny_classifier, tmp_path, capsys):
    images = write_digits(tmp_path / "imgs", {"1": 2})
    out = tmp_path / "out"
    fails(args_for(tiny_world, tiny_classifier, images, out, "--select", "stability"), capsys, "given images do not")
    fails(args_for(tiny_world, tiny_classifier, images, out, "--classes", "6"), capsys, "has no folder for it")
    fails(["--model", str(tiny_world), "--out", str(out)], capsys, "needs --images DIR")
    assert main(["run", "--ipc", "all", "--out", str(out)]) == 2
    assert "--ipc all keeps every given image" in capsys.readouterr().err
    assert not out.exists()


def test_generator_without_encode_is_refused(tiny_world, tiny_classifier, tmp_path):
    import cao2_dit
    host = Host(load_entry_points=False)
    hooks = {n: getattr(cao2_dit, n) for n in dir(cao2_dit) if n.startswith("cao2_") and n != "cao2_encode"}
    plugin = types.ModuleType("noencode")
    plugin.__dict__.update(hooks)
    host.register(plugin, "noencode")
    images = write_digits(tmp_path / "imgs", {"1": 2})
    cfg = config_from_args(build_parser().parse_args(
        ["refine", *args_for(tiny_world, tiny_classifier, images, tmp_path / "out", "--generator", "noencode")]))
    with pytest.raises(UserError, match="no encode hook"):
        engine.run(cfg, host)
    assert not (tmp_path / "out").exists()
