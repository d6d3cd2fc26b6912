"""The embedded MNIST worlds (DiT, the default, and MAR): shipped weights, sample quality, a reduced demo."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cao2core.data import mnist
from cao2core.data.classifiers import embedded_mnist_classifier, load_classifier
from cao2core.cli import main
from cao2core.data.labels import label_space
from cao2core.generators.host import Host
from cao2core.generators.seeding import unit_generators


def test_judge_recognizes_real_mnist():
    clf = load_classifier(None, label_space("mnist"), torch.device("cpu"))
    assert clf.source == str(embedded_mnist_classifier())
    x, y = mnist.load_split("test")
    acc = (clf.probs(x[:2000]).argmax(1) == y[:2000]).float().mean().item()
    assert acc >= 0.97


@pytest.mark.parametrize("generator,seed,bar", [("dit", 1234, 0.85), ("mar", 4321, 0.80)])
def test_world_samples_are_recognized_as_their_class(generator, seed, bar):
    """Quality bar: the real-MNIST classifier recognizes most of each world's samples at the default guidance."""
    gen = Host().generator(generator)
    handle = gen.load(options={}, device=torch.device("cpu"))
    clf = load_classifier(None, label_space("mnist"), torch.device("cpu"))
    labels = torch.arange(10).repeat_interleave(10)
    gens = [g for c in range(10) for g in unit_generators(seed, c, range(10), "sample")]
    latents = gen.sample(handle=handle, labels=labels, generators=gens, snapshot_steps=[]).latents
    acc = (clf.probs(gen.decode(handle=handle, latents=latents)).argmax(1) == labels).float().mean().item()
    assert acc >= bar, acc


@pytest.mark.parametrize("generator", ["dit", "mar"])
def test_encode_decode_round_trip(generator):
    gen = Host().generator(generator)
    handle = gen.load(options={}, device=torch.device("cpu"))
    x, _ = mnist.load_split("test")
    x = x[:64]
    z = gen.encode(handle=handle, pixels=x, generators=[torch.Generator().manual_seed(i) for i in range(64)])
    assert z.shape == (64, 4, 8, 8) and 0.5 < z.std().item() < 2.0     # scaled latents are roughly unit-scale
    assert (gen.decode(handle=handle, latents=z) - x).square().mean().item() < 0.05


def test_default_run_on_the_embedded_world(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["run", "--classes", "1,7", "--ipc", "2", "--pool-factor", "2", "--clo-iters", "3",
                 "--sample-steps", "10", "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "mnist" and m["generator"]["guidance"] >= 1 and m["class_ids"] == ["1", "7"]
    t = load_file(str(out / "latents" / "7.safetensors"))
    assert t["latents"].shape == (2, 4, 8, 8) and (t["scores"] > 0).all()
