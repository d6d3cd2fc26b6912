"""``cao2 eval``: protocols train, reports label final vs best, bad layouts and teachers are refused, seeds hold.

Everything runs on the CPU on a few dozen 32x32 digits (real MNIST images written as PNGs) or tiny RGB images.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cao2core.errors import UserError
from cao2core.scoring import data as D
from cao2core.cli import build_parser, dispatch
from cao2core.scoring.protocols import PROTOCOLS, eval_epochs, lr_factor
from cao2core.scoring.students import ConvNet
from cao2core.data.labels import label_space

NETTE = label_space("nette")
WOOF = label_space("woof")


# --- helpers ---------------------------------------------------------------------------------------------------


def parse(argv):
    return build_parser().parse_args(["eval", *map(str, argv)])


def run_eval(argv):
    return dispatch(parse(argv))


def fails(argv, match, out=None):
    with pytest.raises(UserError) as info:
        run_eval(argv)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    if out is not None:
        assert not Path(out).exists()
    return message


@pytest.fixture(scope="module")
def digits():
    """10 real MNIST validation digits per class, uint8 (N, 32, 32), and their labels."""
    from cao2core.data.mnist import load_split
    x, y = load_split("val")
    picked = torch.cat([torch.nonzero(y == d).flatten()[:10] for d in range(10)])
    return ((x[picked, 0] + 1) * 127.5).round().to(torch.uint8).numpy(), y[picked].numpy()


def write_digits(root: Path, digits, first: int, count: int, names=None) -> Path:
    x, y = digits
    for d in range(10):
        folder = root / (names[d] if names else str(d))
        folder.mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(x[y == d][first:first + count]):
            Image.fromarray(arr, "L").save(folder / f"{i}.png")
    return root


def write_run(root: Path, digits, ipc: int, status="complete") -> Path:
    """A `cao2 run`-style output: manifest.json + images/<digit>/<i>.png."""
    write_digits(root / "images", digits, 0, ipc)
    ids = [str(d) for d in range(10)]
    manifest = {"format": "cao2-run/1", "run_id": "test", "dataset": "mnist", "class_ids": ids,
                "config": {"ipc": ipc}, "classes": {c: {"status": status} for c in ids}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_rgb(root: Path, ids, per_class: int = 2, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for cid in ids:
        (root / cid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(root / cid / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, digits):
    return write_run(tmp_path_factory.mktemp("run"), digits, ipc=5)


@pytest.fixture(scope="module")
def mnist_val(tmp_path_factory, digits):
    return write_digits(tmp_path_factory.mktemp("val"), digits, 5, 5)


QUICK = ["--epochs", "8", "--batch-size", "50", "--eval-every", "4", "--device", "cpu", "--quiet"]


# --- students --------------------------------------------------------------------------------------------------


def test_convnet3_via_timm():
    import cao2core.scoring.students  # noqa: F401  (registers convnet3 with timm)
    model = timm.create_model("convnet3", num_classes=10, in_chans=1)
    assert isinstance(model, ConvNet)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [c.out_channels for c in convs] == [128] * 3 and all(c.kernel_size == (3, 3) for c in convs)
    assert all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)   # instance norm
    assert model.head.in_features == 128 * 4 * 4
    wide = timm.create_model("convnet3", num_classes=5, in_chans=3, img_size=64)
    assert wide(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


# --- protocols and report --------------------------------------------------------------------------------------


def _losses(report, repeat=0):
    return [e["train_loss"] for e in report["repeats"][repeat]["curve"]]


def test_hard_trains_and_reports(mnist_run, mnist_val, capsys):
    assert run_eval(["--data", mnist_run, "--val", mnist_val, "--plot", *QUICK]) == 0
    report = json.loads((mnist_run / "eval" / "eval.json").read_text())
    losses = _losses(report)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert (mnist_run / "eval" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    s = report["summary"]
    assert set(s) >= {"final_acc", "best_epoch_acc", "headline", "repeats"}
    assert s["headline"]["metric"] == "final" and s["headline"]["mean"] == s["final_acc"]["mean"]
    assert "final" in s["final_acc"]["what"] and "optimistic" in s["best_epoch_acc"]["what"]
    tested = [e["epoch"] for e in report["repeats"][0]["curve"] if "test_acc" in e]
    assert tested == [4, 8]
    assert report["data"]["ipc"] == 5 and report["data"]["kind"] == "distilled"
    assert report["config"]["settings"]["student"] == "convnet3"
    out = capsys.readouterr().out
    assert "final acc (%)" in out and "best-epoch acc (%)" in out and "IPC 5" in out


def test_rded_trains_with_teacher(mnist_run, mnist_val, tmp_path):
    assert run_eval(["--data", mnist_run, "--val", mnist_val, "--protocol", "rded", "--out", tmp_path / "r",
                     *QUICK]) == 0
    report = json.loads((tmp_path / "r" / "eval.json").read_text())
    losses = _losses(report)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert report["config"]["teacher"]["source"].endswith("mnist_cnn.safetensors")
    st = report["config"]["settings"]
    assert st["temperature"] == 20 and st["augment"]["cutmix"] and not st["augment"]["patch_shuffle"]


def test_rded_faithful_reports_rded_figure(mnist_run, mnist_val, tmp_path, capsys):
    argv = ["--data", mnist_run, "--val", mnist_val, "--protocol", "rded-faithful", "--out", tmp_path / "f",
            "--epochs", "5", "--eval-every", "1", "--batch-size", "50", "--device", "cpu", "--quiet"]
    assert run_eval(argv) == 0
    report = json.loads((tmp_path / "f" / "eval.json").read_text())
    curve = report["repeats"][0]["curve"]
    late = max(e["test_acc"] for e in curve if e["epoch"] >= 4)
    assert report["summary"]["headline"]["metric"] == "best-last-20%"
    assert report["repeats"][0]["headline_acc"] == late
    assert report["config"]["settings"]["augment"]["patch_shuffle"]
    assert "RDED figure" in capsys.readouterr().out


def test_schedules():
    clean, faithful = PROTOCOLS["rded"], PROTOCOLS["rded-faithful"]
    assert lr_factor(clean, 0, 100, 0, 10) == 1.0 and lr_factor(clean, 100, 100, 10, 10) == pytest.approx(0.0)
    assert lr_factor(faithful, 0, 100, 0, 10) == 1.0
    assert lr_factor(faithful, 100, 100, 10, 10) == pytest.approx(0.5)     # decays only to half the base lr
    assert eval_epochs(10, 4) == [4, 8, 10]


def test_same_seed_same_training(mnist_run, mnist_val, tmp_path):
    argv = ["--data", mnist_run, "--val", mnist_val, "--epochs", "2", "--batch-size", "50", "--device", "cpu",
            "--quiet", "--repeat", "2"]
    run_eval([*argv, "--out", tmp_path / "a"])
    run_eval([*argv, "--out", tmp_path / "b"])
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "ab")
    assert _losses(a, 0) == _losses(b, 0) and _losses(a, 1) == _losses(b, 1)
    assert _losses(a, 0) != _losses(a, 1)                                   # repeats are different seeds
    assert a["summary"]["repeats"] == 2 and len(a["summary"]["final_acc"]["values"]) == 2


# --- teacher class order -------------------------------------------------------------------------------------------


def _teacher(path: Path, classes=None) -> Path:
    model = timm.create_model("mnist_cnn", num_classes=10)
    meta = {"arch": "mnist_cnn", "num_classes": "10"}
    if classes is not None:
        meta["classes"] = json.dumps(classes)
    save_file(model.state_dict(), str(path), metadata=meta)
    return path


def test_teacher_class_mismatch_is_an_error(mnist_run, mnist_val, tmp_path):
    base = ["--data", mnist_run, "--val", mnist_val, "--protocol", "rded", *QUICK]
    wrong = _teacher(tmp_path / "wrong.safetensors", [f"c{i}" for i in range(10)])
    fails([*base, "--teacher", wrong, "--out", tmp_path / "o"], "has no output for class '0'", tmp_path / "o")
    unnamed = _teacher(tmp_path / "unnamed.safetensors")
    message = fails([*base, "--teacher", unnamed, "--out", tmp_path / "o"], "does not say which class", tmp_path / "o")
    assert "--teacher-classes FILE" in message and "--classifier" not in message     # the flags of cao2 eval


def test_teacher_messages_name_the_teacher_flags(mnist_run, mnist_val, tmp_path):
    base = ["--data", mnist_run, "--val", mnist_val, "--protocol", "rded", *QUICK]
    no_arch = tmp_path / "no_arch.safetensors"
    save_file(timm.create_model("mnist_cnn", num_classes=10).state_dict(), str(no_arch))
    message = fails([*base, "--teacher", no_arch, "--out", tmp_path / "o"], "--teacher-arch", tmp_path / "o")
    assert "--classifier" not in message
    message = fails([*base, "--teacher", no_arch, "--teacher-arch", "no_such_net", "--out", tmp_path / "o"],
                    "--teacher-arch", tmp_path / "o")
    assert "--classifier" not in message


def test_teacher_outputs_follow_the_label_space(tmp_path):
    from cao2core.data.classifiers import load_classifier
    from cao2core.scoring.protocols import Teacher
    order = [str(d) for d in (3, 1, 4, 0, 5, 9, 2, 6, 8, 7)]
    space = label_space("mnist")
    teacher = Teacher(load_classifier(str(_teacher(tmp_path / "p.safetensors", order)), space, torch.device("cpu")),
                      space, torch.device("cpu"))
    assert teacher.index.tolist() == [order.index(c) for c in space.ids]


# --- layouts -----------------------------------------------------------------------------------------------------


def test_rded_numeric_folders_need_a_map(tmp_path, digits, mnist_val):
    rded = write_digits(tmp_path / "rded", digits, 0, 2, names=[f"{d:05d}" for d in range(10)])
    fails(["--data", rded, "--dataset", "mnist", "--out", tmp_path / "o", *QUICK],
          "numeric class folders (00000, 00001, ...) as RDED writes them", tmp_path / "o")
    fails(["--data", rded, "--out", tmp_path / "o", *QUICK], "numeric class folders", tmp_path / "o")
    cmap = tmp_path / "map.txt"
    cmap.write_text("".join(f"{d:05d} {d}\n" for d in range(10)))
    files = D.check_layout(rded, label_space("mnist"), "distilled", D.read_class_map(str(cmap)))
    assert [len(files[str(d)]) for d in range(10)] == [2] * 10


def test_other_subset_is_refused(tmp_path):
    nette = write_rgb(tmp_path / "imagenette2-val", NETTE.ids, per_class=1)
    with pytest.raises(UserError, match="holds the classes of dataset nette .*imagenette2.* uses dataset woof"):
        D.check_layout(nette, WOOF, "validation")
    data = write_rgb(tmp_path / "woofdata", WOOF.ids, per_class=1)
    fails(["--data", data, "--val", nette, "--image-size", "16", "--student", "convnet3", "--out", tmp_path / "o",
           *QUICK], "validation folder", tmp_path / "o")


def test_human_names_are_refused(tmp_path):
    names = ["tench", "English_springer", "cassette_player", "chain_saw", "church", "French_horn",
             "garbage_truck", "gas_pump", "golf_ball", "parachute"]
    named = write_rgb(tmp_path / "named", names, per_class=1)
    message = str(pytest.raises(UserError, D.check_layout, named, NETTE, "validation").value)
    assert "by class name ('English_springer'" in message and "n02102040" in message


@pytest.mark.parametrize("folders,match", [
    ([str(d) for d in range(9)], "1 class(es) missing (first: '9')"),
    ([str(d) for d in range(10)] + ["10"], "1 folder(s) not in the dataset (first: '10')"),
    ([str(d) for d in range(10)] + ["extra"], "not in the dataset (first: 'extra')"),
])
def test_missing_or_extra_classes(tmp_path, folders, match):
    root = tmp_path / "d"
    for f in folders:
        (root / f).mkdir(parents=True)
        Image.new("L", (32, 32)).save(root / f / "0.png")
    fails(["--data", root, "--dataset", "mnist", "--out", tmp_path / "o", *QUICK], match, tmp_path / "o")


def test_empty_class_and_unfinished_run(tmp_path, digits):
    run = write_run(tmp_path / "run", digits, ipc=1)
    for p in (run / "images" / "7").iterdir():
        p.unlink()
    fails(["--data", run, *QUICK], "class folder '7' has no images", run / "eval")
    partial = write_run(tmp_path / "partial", digits, ipc=1, status="running")
    fails(["--data", partial, *QUICK], "unfinished cao2 run", partial / "eval")


def test_flags_are_checked(mnist_run, tmp_path):
    fails(["--data", mnist_run, "--full-real", *QUICK], "exactly one of")
    fails(["--data", mnist_run / "images", *QUICK], "pass --out DIR")
    fails(["--data", mnist_run, "--temperature", "4", *QUICK], "--protocol rded")
    fails(["--data", mnist_run, "--student", "no_such_net", *QUICK], "unknown --student")
    fails(["--random-real", "3", "--dataset", "nette", "--out", tmp_path / "o", *QUICK], "--val DIR", tmp_path / "o")


def test_imagenet_world_on_tiny_rgb(tmp_path):
    data = write_rgb(tmp_path / "data", NETTE.ids, per_class=2)
    val = write_rgb(tmp_path / "val", NETTE.ids, per_class=1, size=20)
    assert run_eval(["--data", data, "--val", val, "--image-size", "16", "--student", "convnet3", "--out",
                     tmp_path / "o", "--epochs", "2", "--device", "cpu", "--quiet"]) == 0
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert report["data"]["dataset"] == "nette" and report["config"]["settings"]["channels"] == 3


# --- baselines ---------------------------------------------------------------------------------------------------


def test_random_real_subset_is_seeded():
    labels = torch.arange(10).repeat_interleave(30)
    a = D.random_real_indices(labels, 10, 3, seed=5, repeat=0)
    assert torch.equal(a, D.random_real_indices(labels, 10, 3, seed=5, repeat=0))
    assert not torch.equal(a, D.random_real_indices(labels, 10, 3, seed=6, repeat=0))
    assert not torch.equal(a, D.random_real_indices(labels, 10, 3, seed=5, repeat=1))
    assert torch.bincount(labels[a], minlength=10).tolist() == [3] * 10
    with pytest.raises(UserError, match="only 30 images"):
        D.random_real_indices(labels, 10, 31, seed=0, repeat=0)


def test_random_real_mnist_cli(mnist_val, tmp_path):
    argv = ["--random-real", "2", "--dataset", "mnist", "--val", mnist_val, "--epochs", "1", "--device", "cpu",
            "--quiet", "--seed", "3"]
    run_eval([*argv, "--out", tmp_path / "a"])
    run_eval([*argv, "--out", tmp_path / "b"])
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "ab")
    assert a["repeats"][0]["data"]["subset"] == b["repeats"][0]["data"]["subset"]
    assert len(a["repeats"][0]["data"]["subset"]) == 20
    assert a["data"]["kind"] == "random-real" and "random real IPC 2" in a["data"]["label"]


def test_mnist_students_can_be_tested_on_the_validation_split(tmp_path):
    """Settings are chosen on the 10k validation split held out from train, never on the test split."""
    from cao2core.data.mnist import load_split
    _, y_val = load_split("val")
    run_eval(["--random-real", "1", "--dataset", "mnist", "--classes", "0,1", "--epochs", "1", "--device", "cpu",
              "--quiet", "--mnist-split", "val", "--out", tmp_path / "v"])
    report = json.loads((tmp_path / "v" / "eval.json").read_text())
    assert "val split" in report["data"]["val"] and report["data"]["val_images"] == int((y_val < 2).sum())


def test_a_runs_set_is_what_its_records_list(tmp_path, digits):
    """A file a person (or a thumbnailing viewer) put in a class folder is kept by the run, not trained on."""
    run = write_run(tmp_path / "run", digits, ipc=2)
    manifest = json.loads((run / "manifest.json").read_text())
    for cid in manifest["class_ids"]:
        manifest["classes"][cid]["files"] = {"images": {"0.png": "-", "1.png": "-"}, "latents": "-"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    Image.fromarray(digits[0][0], "L").save(run / "images" / "3" / "mine.png")
    opened = D.open_distilled(str(run), None, None)
    assert sorted(p.name for p in opened.images["3"]) == ["0.png", "1.png"]
    assert all(len(paths) == 2 for paths in opened.images.values())


def test_read_only_output_is_refused_before_training(tmp_path, digits, mnist_val, monkeypatch):
    import tempfile

    from cao2core.scoring import protocols

    run = write_run(tmp_path / "run", digits, ipc=2)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def never(*args, **kwargs):
        raise AssertionError("a student was trained")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)       # as on a read-only folder (root ignores chmod)
    monkeypatch.setattr(protocols, "train_one", never)
    fails(["--data", run, "--val", mnist_val, *QUICK], "--out", run / "eval")
    message = fails(["--data", run, "--val", mnist_val, *QUICK], "cannot be written")
    assert "Permission denied" in message


def test_output_inside_the_data_is_refused(tmp_path, digits, mnist_val):
    folder = write_digits(tmp_path / "set", digits, 0, 2)
    fails(["--data", folder, "--val", mnist_val, "--out", folder, *QUICK], "--out")
    fails(["--data", folder, "--val", mnist_val, "--out", folder / "eval", *QUICK], "is inside --data")
    fails(["--data", folder, "--val", mnist_val, "--out", tmp_path, *QUICK], "--data")
    assert sorted(p.name for p in folder.iterdir()) == [str(d) for d in range(10)]


def test_output_inside_the_validation_data_is_refused(tmp_path, digits, mnist_val):
    folder = write_digits(tmp_path / "set", digits, 0, 2)
    before = sorted(p.name for p in Path(mnist_val).iterdir())
    fails(["--data", folder, "--val", mnist_val, "--out", Path(mnist_val) / "eval", *QUICK], "is inside --val")
    assert sorted(p.name for p in Path(mnist_val).iterdir()) == before
