"""Local classifier and teacher checkpoints: what a float model saves is loaded (BatchNorm's integer counters
included), quantized weights, duplicate class ids, non-finite accuracies and malformed metadata are one line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from cao2core.cli import main
from cao2core.data.classifiers import load_classifier
from cao2core.data.labels import label_space
from cao2core.errors import UserError

MNIST = label_space("mnist")
DIGITS = [str(d) for d in range(10)]


def resnet18_state(source: str) -> dict[str, torch.Tensor]:
    """A random resnet18's state dict as its library saves it: timm's on 1 channel, torchvision's on 3."""
    torch.manual_seed(0)
    if source == "timm":
        return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1).state_dict()
    return torchvision.models.resnet18(weights=None, num_classes=10).state_dict()


def save_state(state: dict, path: Path, metadata: dict | None = None) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    else:
        torch.save(state, path)
    return path


def class_file(path: Path, lines=DIGITS) -> Path:
    path.write_text("".join(f"{c}\n" for c in lines))
    return path


def digit_folder(root: Path) -> Path:
    """An ImageFolder of the 10 MNIST classes, one random 32x32 grayscale image each."""
    rng = np.random.default_rng(0)
    for cid in DIGITS:
        (root / cid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(root / cid / "0.png")
    return root


def run_args(tiny_world, classifier, out, *extra):
    return ["run", "--model", str(tiny_world), "--classifier", str(classifier), "--classes", "0,1", "--ipc", "1",
            "--pool-factor", "1", "--clo-iters", "1", "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def eval_args(data, teacher, out, *extra):
    return ["eval", "--data", str(data), "--dataset", "mnist", "--val", str(data), "--protocol", "rded",
            "--teacher", str(teacher), "--epochs", "1", "--batch-size", "10", "--device", "cpu", "--quiet",
            "--out", str(out), *extra]


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cao2: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


# --- 1. BatchNorm's integer buffers are no quantized weights --------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_a_batchnorm_checkpoint_is_a_classifier_and_a_teacher(tiny_world, tmp_path, capsys, source, suffix):
    state = resnet18_state(source)
    assert state["bn1.num_batches_tracked"].dtype == torch.int64       # what every BatchNorm model saves
    ckpt = save_state(state, tmp_path / f"rn18{suffix}")
    classes = class_file(tmp_path / "classes.txt")
    flags = ("--classifier-arch", "resnet18", "--classifier-classes", str(classes))
    assert main(run_args(tiny_world, ckpt, tmp_path / "o", *flags)) == 0, capsys.readouterr().err
    out = tmp_path / "o"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0", "1"]
    assert json.loads((out / "manifest.json").read_text())["classifier"]["source"] == str(ckpt)

    loaded = load_classifier(str(ckpt), MNIST, torch.device("cpu"), "resnet18", str(classes))
    for name, value in state.items():                                  # loaded as saved, counters included
        torch.testing.assert_close(loaded.model.state_dict()[name], value, rtol=0, atol=0)
    assert loaded.in_chans == (1 if source == "timm" else 3)

    data = digit_folder(tmp_path / "digits")
    teacher = ("--teacher-arch", "resnet18", "--teacher-classes", str(classes))
    assert main(eval_args(data, ckpt, tmp_path / "e", *teacher)) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["config"]["teacher"]["source"] == str(ckpt)


def test_integer_weights_stay_refused(tiny_world, tmp_path, capsys):
    state = resnet18_state("timm")
    quantized = dict(state, **{"conv1.weight": state["conv1.weight"].to(torch.int8)})
    ckpt = save_state(quantized, tmp_path / "q.safetensors")
    classes = class_file(tmp_path / "classes.txt")
    assert main(run_args(tiny_world, ckpt, tmp_path / "o", "--classifier-arch", "resnet18",
                         "--classifier-classes", str(classes))) == 2
    one_line_error(capsys, "weight 'conv1.weight' is int8, not floating point", str(ckpt))
    assert not (tmp_path / "o").exists()
    # an integer tensor where the model keeps a float buffer is damaged too
    counted = dict(state, **{"bn1.running_mean": state["bn1.running_mean"].to(torch.int64)})
    with pytest.raises(UserError, match="weight 'bn1.running_mean' is int64"):
        load_classifier(str(save_state(counted, tmp_path / "c.pt")), MNIST, torch.device("cpu"), "resnet18",
                        str(classes))


# --- 3. duplicate class ids, non-finite accuracies -------------------------------------------------------------


def mnist_checkpoint(path: Path, **metadata) -> Path:
    """The tiny MNIST judge's architecture with random weights and the given metadata over the usual."""
    torch.manual_seed(0)
    model = timm.create_model("mnist_cnn", num_classes=10)
    meta = {"arch": "mnist_cnn", "num_classes": "10", "classes": json.dumps(DIGITS), **metadata}
    return save_state(model.state_dict(), path, {k: v for k, v in meta.items() if v is not None})


def test_a_class_listed_twice_in_the_metadata_is_refused(tiny_world, tmp_path, capsys):
    ckpt = mnist_checkpoint(tmp_path / "dup.safetensors", classes=json.dumps([*DIGITS[:9], "1"]))
    assert main(run_args(tiny_world, ckpt, tmp_path / "o")) == 2
    one_line_error(capsys, str(ckpt), "lists class '1' twice")
    assert not (tmp_path / "o").exists()


def test_a_class_listed_twice_in_a_class_file_is_refused(tiny_world, tiny_classifier, tmp_path, capsys):
    classes = class_file(tmp_path / "classes.txt", [*DIGITS[:9], "3 three again"])
    assert main(run_args(tiny_world, tiny_classifier, tmp_path / "o", "--classifier-classes", str(classes))) == 2
    one_line_error(capsys, f"--classifier-classes {classes}", "lists class '3' twice")
    assert not (tmp_path / "o").exists()


def test_accuracies_as_a_list_or_an_object_are_read(tmp_path):
    listed = np.linspace(0.5, 0.95, 10).round(3).tolist()
    for n, given in enumerate((listed, dict(zip(DIGITS, listed)))):
        ckpt = mnist_checkpoint(tmp_path / f"{n}.safetensors", class_accuracy=json.dumps(given))
        loaded = load_classifier(str(ckpt), MNIST, torch.device("cpu"))
        assert loaded.class_accuracy == dict(zip(DIGITS, listed))


BAD_METADATA = [
    ({"class_accuracy": '{"0": NaN}'}, "'class_accuracy' of class '0' is NaN"),
    ({"class_accuracy": json.dumps([0.9] * 9 + [float("inf")])}, "'class_accuracy' of class '9' is Infinity"),
    ({"class_accuracy": "0.9"}, "metadata 'class_accuracy' must be"),
    ({"class_accuracy": json.dumps(["high"] * 10)}, "'class_accuracy' of class '0' is \"high\""),
    ({"class_accuracy": json.dumps([True] * 10)}, "'class_accuracy' of class '0' is true"),
    ({"class_accuracy": json.dumps([0.9] * 3)}, "has 3 entries for 10 classes"),
    ({"class_accuracy": "[0.9,"}, "metadata 'class_accuracy' is not valid JSON"),
    ({"classes": "[\"0\", "}, "metadata 'classes' is not valid JSON"),
    ({"classes": json.dumps(list(range(10)))}, "metadata 'classes' must be a JSON list of class id strings"),
    ({"classes": '"0123456789"'}, "metadata 'classes' must be a JSON list of class id strings"),
    ({"num_classes": "ten"}, "metadata num_classes='ten' is not a positive whole number"),
    ({"num_classes": "0"}, "metadata num_classes='0' is not a positive whole number"),
    ({"in_chans": "one"}, "metadata in_chans='one' is not a positive whole number"),
    ({"arch": "resnet_nonexistent"}, "architecture 'resnet_nonexistent' is not a timm model"),
]


@pytest.mark.parametrize("metadata,match", BAD_METADATA)
def test_malformed_classifier_metadata_is_one_line(tiny_world, tmp_path, capsys, metadata, match):
    ckpt = mnist_checkpoint(tmp_path / "bad.safetensors", **metadata)
    assert main(run_args(tiny_world, ckpt, tmp_path / "o")) == 2
    one_line_error(capsys, str(ckpt), match)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("metadata,match", BAD_METADATA[::3])
def test_malformed_teacher_metadata_is_one_line(tmp_path, capsys, metadata, match):
    ckpt = mnist_checkpoint(tmp_path / "bad.safetensors", **metadata)
    data = digit_folder(tmp_path / "digits")
    assert main(eval_args(data, ckpt, tmp_path / "e")) == 2
    one_line_error(capsys, str(ckpt), match)
    assert not (tmp_path / "e").exists()


# --- 4. checkpoints that are no state dict ----------------------------------------------------------------------


@pytest.mark.parametrize("content,what", [
    ([torch.zeros(2)], "it holds a list"),
    ({"state_dict": [torch.zeros(2)]}, "it holds a list"),
    ({"conv.weight": torch.zeros(2), "epoch": 3}, "it holds an int among its entries"),
    ({}, "it holds no tensor"),
])
def test_a_pt_file_that_is_no_state_dict_is_one_line(tiny_world, tmp_path, capsys, content, what):
    ckpt = tmp_path / "odd.pt"
    torch.save(content, ckpt)
    classes = class_file(tmp_path / "classes.txt")
    assert main(run_args(tiny_world, ckpt, tmp_path / "o", "--classifier-arch", "mnist_cnn",
                         "--classifier-classes", str(classes))) == 2
    one_line_error(capsys, str(ckpt), "is not a state dict of tensors", what)
    data = digit_folder(tmp_path / "digits")
    assert main(eval_args(data, ckpt, tmp_path / "e", "--teacher-arch", "mnist_cnn")) == 2
    one_line_error(capsys, str(ckpt), "is not a state dict of tensors")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()



def test_the_default_imagenet_classifier_offline_and_uncached_is_one_quick_line(empty_hub):
    import time
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        load_classifier(None, label_space("in1k"), torch.device("cpu"))
    message = str(info.value)
    assert time.perf_counter() - start < 5 and "\n" not in message
    assert f"timm/resnet18.tv_in1k is not in the Hugging Face cache ({empty_hub})" in message
    assert "HF_HUB_OFFLINE is set" in message and "pass --classifier with a local checkpoint" in message


def test_the_default_imagenet_classifier_loads_offline_from_the_hub_cache(empty_hub, tmp_path, monkeypatch):
    from hub_files import add_to_hub_cache
    torch.manual_seed(0)
    published = timm.create_model("resnet18", pretrained=False).state_dict()    # timm's layout, 1000 classes
    save_file(published, str(tmp_path / "model.safetensors"))
    add_to_hub_cache(empty_hub, "timm/resnet18.tv_in1k", {"model.safetensors": tmp_path / "model.safetensors"})
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub"))
    clf = load_classifier(None, label_space("in1k"), torch.device("cpu"))
    assert clf.source == "resnet18.tv_in1k" and len(clf.classes) == 1000
    for name, value in clf.model.state_dict().items():
        assert torch.equal(value, published[name]), name
