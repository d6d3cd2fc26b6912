"""The embedded MNIST world of the MAR plugin: shipped weights, sample quality, the default `--generator mar` run."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from cao2core import mnist
from cao2core.classifiers import load_classifier
from cao2core.cli import main
from cao2core.labels import label_space
from cao2core.plugins import Host
from cao2core.seeding import unit_generators

CPU = torch.device("cpu")


def test_mar_samples_are_recognized_as_their_class():
    """Quality bar: the judge recognizes >= 80% of the MAR world's samples at the default guidance."""
    gen = Host().generator("mar")
    handle = gen.load(options={}, device=CPU)
    clf = load_classifier(None, label_space("mnist"), CPU)
    labels = torch.arange(10).repeat_interleave(10)
    gens = [g for c in range(10) for g in unit_generators(4321, c, range(10), "sample")]
    latents = gen.sample(handle=handle, labels=labels, generators=gens, snapshot_steps=[]).latents
    acc = (clf.probs(gen.decode(handle=handle, latents=latents)).argmax(1) == labels).float().mean().item()
    assert acc >= 0.80, acc


def test_world_vae_round_trip():
    gen = Host().generator("mar")
    handle = gen.load(options={}, device=CPU)
    x, _ = mnist.load_split("test")
    z = gen.encode(handle=handle, pixels=x[:64], generators=[torch.Generator().manual_seed(i) for i in range(64)])
    assert z.shape == (64, 4, 8, 8) and 0.5 < z.std().item() < 2.0
    assert (gen.decode(handle=handle, latents=z) - x[:64]).square().mean().item() < 0.05


def test_default_mar_run_on_the_embedded_world(tmp_path):
    out = tmp_path / "demo"
    assert main(["run", "--generator", "mar", "--classes", "1,7", "--ipc", "2", "--pool-factor", "2",
                 "--clo-iters", "3", "--select", "stability", "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "mnist" and m["generator"]["family"] == "mar" and m["class_ids"] == ["1", "7"]
    assert m["generator"]["model"]["preset"] == "mnist_small" and m["generator"]["vae"]["config"]["z_channels"] == 4
    t = load_file(str(out / "latents" / "7.safetensors"))
    assert t["latents"].shape == (2, 4, 8, 8) and (t["scores"] > 0).all()
