"""The default `--generator mar` run on the MAR plugin's embedded MNIST world (its sample quality and VAE are
checked beside the DiT world's in test_world.py)."""
from __future__ import annotations

import json

from safetensors.torch import load_file

from cao2core.cli import main


def test_default_mar_run_on_the_embedded_world(tmp_path):
    out = tmp_path / "demo"
    assert main(["run", "--generator", "mar", "--classes", "1,7", "--ipc", "2", "--pool-factor", "2",
                 "--clo-iters", "3", "--select", "stability", "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"] == "mnist" and m["generator"]["family"] == "mar" and m["class_ids"] == ["1", "7"]
    assert m["generator"]["model"]["preset"] == "mnist_small" and m["generator"]["vae"]["config"]["z_channels"] == 4
    t = load_file(str(out / "latents" / "7.safetensors"))
    assert t["latents"].shape == (2, 4, 8, 8) and (t["scores"] > 0).all()
