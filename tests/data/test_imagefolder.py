"""Reading image folders: high-depth images keep their full range, decompression bombs and values of unknown
scale are refused in one line, and a distilled folder missing a class says so."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.scoring import data as D
from cao2core.data.imagefolder import check_image, load_image

RAMP = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)       # 0..65535 in steps of 257


def png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the last axis) written by hand: PIL writes only grey."""
    arr = arr if arr.ndim == 3 else arr[..., None]
    h, w, c = arr.shape
    rows = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def one_line(exc) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- full range ----------------------------------------------------------------------------------------------


def test_16_bit_grey_keeps_its_full_range(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(RAMP).save(path)
    assert Image.open(path).mode == "I;16"
    grey = load_image(path, 1, 16)
    assert grey.shape == (1, 16, 16) and grey.flatten().tolist() == list(range(256))
    assert torch.equal(load_image(path, 3, 16), grey.expand(3, -1, -1))


def test_16_bit_colour_keeps_its_full_range(tmp_path):
    rgb = np.stack([RAMP, RAMP[::-1], np.full_like(RAMP, 32896)], -1)
    for arr, name in ((rgb, "rgb.png"), (np.concatenate([rgb, RAMP[..., None]], -1), "rgba.png"),
                      (np.stack([RAMP, RAMP], -1), "la.png")):
        x = load_image(png16(tmp_path / name, arr), 3, 16).permute(1, 2, 0).numpy().astype(int)
        expected = np.round(arr[..., :3] / 257) if arr.shape[-1] > 2 else np.round(arr[..., :1] / 257)
        assert np.abs(x - expected).max() <= 1, name          # not clipped: mid grey stays mid grey


def test_32_bit_and_float_images_keep_their_range(tmp_path):
    Image.fromarray(RAMP.astype(np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert load_image(tmp_path / "i.tif", 1, 16).flatten().tolist() == list(range(256))
    Image.fromarray((RAMP / 65535).astype(np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert load_image(tmp_path / "f.tif", 1, 16).flatten().tolist() == list(range(256))


@pytest.mark.parametrize("values,match", [
    (np.full((16, 16), 2.5, np.float32), "floating-point values outside [0, 1]"),
    (np.full((16, 16), 70000, np.int32), "32-bit values outside the 16-bit range"),
])
def test_values_of_unknown_scale_are_refused(tmp_path, values, match):
    path = tmp_path / "x.tif"
    Image.fromarray(values).save(path)
    for read in (lambda: load_image(path, 1, 16), lambda: check_image(path, "--images")):
        with pytest.raises(UserError) as exc:
            read()
        assert match in one_line(exc) and str(path) in str(exc.value)


# --- decompression bombs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [200, 100])      # 256 pixels: over the limit (PIL warns), over twice (PIL raises)
def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch, limit):
    path = tmp_path / "bomb.png"
    Image.new("L", (16, 16)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    for read in (lambda: load_image(path, 1, 16), lambda: check_image(path, "--images")):
        with pytest.raises(UserError) as exc:
            read()
        assert f"{path} is too large to decode safely" in one_line(exc)


def test_an_unreadable_file_in_a_loader_worker_is_one_line(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    Image.new("L", (32, 32)).save(tmp_path / "good.png")
    files = [tmp_path / "good.png", tmp_path / "bad.png"]
    images = D.ImageSet("t", torch.tensor([0, 1]), 1, 32, files=files)
    with pytest.raises(UserError) as exc:
        list(images.batches(torch.arange(2), 1, workers=1))
    assert one_line(exc).startswith(f"cannot read {tmp_path / 'bad.png'} (")


def digit_folder(root: Path, classes=range(10), size: int = 32) -> Path:
    for d in classes:
        (root / str(d)).mkdir(parents=True, exist_ok=True)
        Image.new("L", (size, size), 40 * (d % 6)).save(root / str(d) / "0.png")
    return root


def test_eval_refuses_a_decompression_bomb(tmp_path, monkeypatch, capsys):
    data = digit_folder(tmp_path / "d")
    Image.new("L", (64, 64)).save(data / "3" / "1.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)     # 32x32 images pass, the 64x64 one is a bomb
    assert main(["eval", "--data", str(data), "--out", str(tmp_path / "o"), "--epochs", "1", "--device", "cpu",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{data / '3' / '1.png'} is too large to decode safely" in err, err
    assert not (tmp_path / "o").exists()


def test_refine_refuses_a_decompression_bomb(tiny_world, tiny_classifier, tmp_path, monkeypatch, capsys):
    images = digit_folder(tmp_path / "imgs", classes=(1, 2))
    Image.new("L", (64, 64)).save(images / "2" / "1.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    out = tmp_path / "out"
    assert main(["refine", "--images", str(images), "--model", str(tiny_world), "--classifier", str(tiny_classifier),
                 "--clo-iters", "1", "--out", str(out), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--images: {images / '2' / '1.png'} is too large" in err, err
    assert not out.exists()


def test_refine_reads_16_bit_images_with_their_range(tiny_world, tiny_classifier, tmp_path, monkeypatch):
    from cao2core.method import pools
    eight, sixteen = tmp_path / "eight", tmp_path / "sixteen"
    (eight / "1").mkdir(parents=True)
    (sixteen / "1").mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(sixteen / "1" / "0.png")
    Image.fromarray(np.round(ramp / 257).astype(np.uint8), "L").save(eight / "1" / "0.png")
    seen = []
    real = pools.load_image
    monkeypatch.setattr(pools, "load_image", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for images in (eight, sixteen):
        assert main(["refine", "--images", str(images), "--model", str(tiny_world), "--classifier",
                     str(tiny_classifier), "--clo-iters", "1", "--out", str(tmp_path / f"{images.name}-out"),
                     "--no-progress", "--device", "cpu"]) == 0
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


# --- a distilled folder missing a class ----------------------------------------------------------------------


def test_a_folder_missing_a_class_says_which_and_what_to_do(tmp_path):
    data = digit_folder(tmp_path / "d", classes=range(9))
    with pytest.raises(UserError) as exc:
        D.open_distilled(str(data), None, None)
    message = one_line(exc)
    assert "has 9 of the 10 class folders of dataset mnist: folder '9' is missing" in message, message
    assert "finish the cao2 run" in message and "RDED" not in message
    shutil.rmtree(data / "8")
    assert "folder '8' (and 1 more) is missing" in str(pytest.raises(UserError, D.open_distilled, str(data), None,
                                                                   None).value)


def test_a_run_missing_a_class_folder_says_to_rerun_it(tmp_path):
    run = tmp_path / "run"
    digit_folder(run / "images", classes=range(9))
    ids = [str(d) for d in range(10)]
    (run / "manifest.json").write_text(json.dumps({"format": "cao2-run/1", "run_id": "r", "dataset": "mnist",
                                                   "class_ids": ids, "classes": {c: {"status": "complete"}
                                                                                 for c in ids}}))
    with pytest.raises(UserError) as exc:
        D.open_distilled(str(run), None, None)
    assert "folder images/9 is missing; rerun its `cao2 run` command to redo it" in one_line(exc)
