"""Loading MAR checkpoints written in the published layouts, and every bad MAR input as a one-line error."""
from __future__ import annotations

import argparse

import pytest
import torch

from cao2_mar import loading
from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.generators.host import Host
from mar_tiny import TINY_MAR, make_mar_world, make_published, tiny_vae, write_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return make_published(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="module")
def mar_world(tmp_path_factory):
    return make_mar_world(tmp_path_factory.mktemp("marworld"))


def load(**options):
    return Host().generator("mar").load(options=options, device=CPU)


def test_published_checkpoint_loads_strictly_with_the_ema_weights(published):
    ckpt, vae, mar_json, vae_json, ema = published
    handle = load(model=str(ckpt), vae=str(vae), preset=mar_json, vae_config=vae_json)
    for k, v in ema.state_dict().items():
        assert torch.equal(handle.model.state_dict()[k], v), k                # EMA wins over "model"
    assert not handle.model.training and not any(p.requires_grad for p in handle.model.parameters())
    assert not any(p.requires_grad for p in handle.vae.parameters())
    assert handle.label_space is None and handle.steps == 32 and handle.cfg_schedule == "linear"


def test_preset_defaults_to_the_checkpoints_args(published):
    ckpt, vae, _, vae_json, ema = published                 # args.model names the tiny config file
    handle = load(model=str(ckpt), vae=str(vae), vae_config=vae_json)
    assert handle.model.cfg == TINY_MAR


def test_checkpoint_is_read_with_weights_only(tmp_path):
    import datetime                                                 # any class but Namespace is refused
    torch.save({"model": {}, "model_ema": {}, "args": argparse.Namespace(), "x": datetime.date(2024, 9, 27)},
               tmp_path / "c.pth")
    with pytest.raises(UserError, match="cannot read MAR checkpoint"):
        loading.read_mar_checkpoint(tmp_path / "c.pth")


def test_wrong_diffloss_size_names_the_mismatch(published, tmp_path):
    ckpt, vae, _, vae_json, _ = published
    other = write_config(tmp_path / "wide.json", TINY_MAR.__class__(**{**TINY_MAR.to_dict(), "diffloss_w": 48}))
    with pytest.raises(UserError, match=r"does not fit preset .*wide.json \(DiffLoss 1x48\): shape mismatch"):
        load(model=str(ckpt), vae=str(vae), preset=other, vae_config=vae_json)


def run_fails(args, capsys, match, out):
    rc = main(["run", "--generator", "mar", *args, "--out", str(out), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("cao2: error: "), err
    assert match in err, err
    assert not out.exists()


def test_wrong_preset_for_a_checkpoint(published, capsys, tmp_path):
    ckpt, vae, _, vae_json, _ = published
    run_fails(["--model", str(ckpt), "--vae", str(vae), "--gen-opt", "preset=mar_base", "--gen-opt",
               f"vae_config={vae_json}", "--dataset", "mnist"], capsys, "does not fit preset mar_base", tmp_path / "o")


def test_checkpoint_without_model_ema(tmp_path, capsys):
    ckpt, vae, mar_json, vae_json, _ = make_published(tmp_path / "noema", with_ema=False)
    run_fails(["--model", str(ckpt), "--vae", str(vae), "--gen-opt", f"preset={mar_json}", "--dataset", "mnist"],
              capsys, "has no 'model_ema'", tmp_path / "o")


def test_vae_of_the_wrong_layout(published, tmp_path, capsys):
    ckpt, _, mar_json, vae_json, _ = published
    state = {k.replace(".block.", ".resnets."): v for k, v in tiny_vae().state_dict().items()}   # not LDM keys
    torch.save({"model": state}, tmp_path / "bad.ckpt")
    run_fails(["--model", str(ckpt), "--vae", str(tmp_path / "bad.ckpt"), "--gen-opt", f"preset={mar_json}",
               "--gen-opt", f"vae_config={vae_json}", "--dataset", "mnist"], capsys,
              "does not fit the LDM-layout KL VAE", tmp_path / "o")


def test_checkpoint_needs_a_vae(published, tmp_path, capsys):
    ckpt, _, mar_json, _, _ = published
    run_fails(["--model", str(ckpt), "--gen-opt", f"preset={mar_json}"], capsys, "pass --vae kl16.ckpt",
              tmp_path / "o")


@pytest.mark.parametrize("value", ["0,1", "0.5,1.2", "0.9,0.8", "-1,0.5", "half"])
def test_mask_ratio_outside_the_unit_interval(mar_world, tmp_path, capsys, value):
    run_fails(["--model", str(mar_world), "--gen-opt", f"mask_ratio={value}"], capsys, "mask_ratio", tmp_path / "o")


def test_stability_needs_two_sampler_steps(mar_world, tmp_path, capsys):
    run_fails(["--model", str(mar_world), "--select", "stability", "--sample-steps", "1"], capsys,
              "--select stability", tmp_path / "o")


@pytest.mark.parametrize("opt,match", [("cfg_schedule=cosine", "cfg_schedule"), ("colour=red", "unknown --gen-opt"),
                                       ("preset=mar_tiny", "not one of mar_base"), ("temperature=hot", "temperature=hot: mar cannot read it"),
                                       ("clip_x0=-1", "clip_x0")])
def test_bad_generator_options(mar_world, tmp_path, capsys, opt, match):
    run_fails(["--model", str(mar_world), "--gen-opt", opt], capsys, match, tmp_path / "o")


def test_missing_checkpoint(tmp_path, capsys):
    run_fails(["--model", str(tmp_path / "checkpoint-last.pth"), "--vae", "kl16.ckpt"], capsys, "not found",
              tmp_path / "o")


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", "should hold a JSON object"), ('{"mar": ', "is not valid JSON"),
    ('{"sample_steps": "8"}', "sample_steps is '8'; it should be a whole number"),
    ('{"guidance": true}', "guidance is True; it should be a number"),
    ('{"mar": 3}', "mar is 3; it should be a JSON object or a preset name")])
def test_a_broken_world_cao2_json_names_the_file(tmp_path, text, match):
    (tmp_path / "cao2.json").write_text(text)
    with pytest.raises(UserError, match=match) as info:
        loading.read_defaults(tmp_path)
    assert str(tmp_path / "cao2.json") in str(info.value)
