"""SiT's and REPA's checkpoints load strictly in their original layouts and compute the papers' forward, the time
embedding of t in [0, 1] included. Expectations come from ``sit_original`` (written from the definitions)."""
from __future__ import annotations

import argparse

import pytest
import torch

import sit_original as so
from cao2_sit import cao2_describe, cao2_latent_spec, cao2_load, loading
from cao2_sit.model import timestep_embedding
from cao2core.errors import UserError
from sit_files import HEADS, options, write_checkpoint, write_vae

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sit-files")
    return {kind: write_checkpoint(root, kind) for kind in ("sit", "repa", "repa-qk")}, write_vae(root), root


@pytest.mark.parametrize("kind,family", [("sit", "sit"), ("repa", "repa"), ("repa-qk", "repa")])
def test_the_loaded_checkpoint_is_the_original_forward_for_t_across_0_1(files, kind, family):
    (state, path), vae = files[0][kind], files[1]
    handle = cao2_load(options=options(path, vae), device=CPU)
    assert handle.family == family and handle.transformer.config.learn_sigma == (kind == "sit")
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 1, 11)
    x, y = torch.randn(11, 4, 8, 8, generator=g), torch.arange(11) % 11      # label 10 = the null class
    with torch.no_grad():
        ours = handle.transformer(x, t, y)
    ref = so.forward(state, x, t, y, HEADS)
    assert ours.shape == (11, 4, 8, 8)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    # the time enters as it is: the same network told 1000 t (a DDPM-style scale) is another function
    with torch.no_grad():
        assert (handle.transformer(x, t * 1000, y) - ref).abs().max() > 1e-2 * ref.abs().max()


def test_the_time_embedding_is_glides_sinusoid_of_raw_t():
    t = torch.rand(64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(timestep_embedding(t), so.time_embedding(t), atol=1e-6, rtol=0)


def test_repas_projectors_are_set_aside_in_one_line(files, capsys):
    (state, path), vae = files[0]["repa-qk"], files[1]
    handle = cao2_load(options=options(path, vae), device=CPU)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "setting aside 12 entries of REPA's training-only projectors" in err[0]
    assert "projectors.0.0.bias" in err[0]
    assert cao2_describe(handle=handle)["model"]["set_aside"] == 12
    assert handle.transformer.config.qk_norm


@pytest.mark.parametrize("damage,words", [
    (lambda s: s.pop("blocks.1.mlp.fc2.bias"), "missing blocks.1.mlp.fc2.bias"),
    (lambda s: s.__setitem__("blocks.0.attn.proj.weight", torch.zeros(32, 16)), "shape mismatch blocks.0.attn.proj"),
    (lambda s: s.__setitem__("decoder_norm.weight", torch.zeros(3)), "unexpected decoder_norm.weight"),
])
def test_a_missing_mis_shaped_or_unknown_model_entry_is_an_error(files, tmp_path, damage, words):
    state = dict(files[0]["repa"][0])
    damage(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=words):
        loading.load_model(str(tmp_path / "bad.pt"), num_heads=HEADS)


def test_training_checkpoints_and_repas_legacy_layout_load(files, tmp_path):
    state = files[0]["repa"][0]
    reference, _, _ = loading.load_model(str(files[0]["repa"][1]), num_heads=HEADS)
    # train.py's {"ema": ...}; the legacy layout: blocks.0..(e-1) then decoder_blocks.0.. (encoder depth e = 1)
    legacy = {(k.replace("blocks.1.", "decoder_blocks.0.") if k.startswith("blocks.1.") else k): v
              for k, v in state.items()}
    torch.save({"ema": legacy, "model": legacy}, tmp_path / "train.pt")
    model, family, _ = loading.load_model(str(tmp_path / "train.pt"), num_heads=HEADS)
    assert family == "repa"
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_a_pickled_object_is_refused_not_executed(files, tmp_path):
    torch.save({"ema": files[0]["sit"][0], "args": argparse.Namespace(model="SiT-XL/2")}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="holds Python objects besides tensors"):
        loading.load_model(str(tmp_path / "ckpt.pt"), num_heads=HEADS)


def test_the_family_is_never_guessed(files, tmp_path):
    """Without projectors and without a learned-sigma output a file could be either code's; they run in opposite
    time directions, so the user says which."""
    state = {k: v for k, v in files[0]["repa"][0].items() if not k.startswith("projectors.")}
    torch.save(state, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="pass --gen-opt family=sit"):
        loading.load_model(str(tmp_path / "plain.pt"), num_heads=HEADS)
    assert loading.load_model(str(tmp_path / "plain.pt"), "repa", num_heads=HEADS)[1] == "repa"
    assert loading.load_model(str(tmp_path / "plain.pt"), "sit", num_heads=HEADS)[1] == "sit"
    with pytest.raises(UserError, match="REPA checkpoint"):
        loading.load_model(str(files[0]["repa"][1]), "sit", num_heads=HEADS)
    with pytest.raises(UserError, match="learned-sigma"):
        loading.load_model(str(files[0]["sit"][1]), "repa", num_heads=HEADS)


def test_sizes_come_from_the_weights_or_are_checked_against_arch(files):
    path = str(files[0]["sit"][1])
    with pytest.raises(UserError, match="pass --gen-opt num_heads=N"):
        loading.load_model(path)
    with pytest.raises(UserError, match="not SiT-XL/2"):
        loading.load_model(path, arch="SiT-XL/2", num_heads=HEADS)
    state = so.random_state(depth=1, width=384, patch=4, grid=2, heads=6)
    cfg = loading.infer_config(state, "s.pt")
    assert (cfg.num_heads, cfg.depth, cfg.patch_size, cfg.input_size, cfg.num_classes) == (6, 1, 4, 8, 10)


def test_spec_and_manifest_say_what_runs(files):
    handle = cao2_load(options=options(files[0]["sit"][1], files[1]), device=CPU)
    spec = cao2_latent_spec(handle=handle)
    assert (spec.shape, spec.num_classes, spec.level_range, spec.default_level_max) == ((4, 8, 8), 10, (1, 999), 224)
    assert spec.label_space is None and spec.sample_steps == 250
    d = cao2_describe(handle=handle)
    assert (d["code"], d["path"], d["prediction"], d["data_at_t"], d["null_label"]) == ("sit", "linear", "velocity",
                                                                                         1.0, 10)
    assert d["sampler"] == {"name": "sde", "steps": 250, "guidance": 1.5, "cfg_channels": 3, "diffusion_form": "sigma",
                            "diffusion_norm": 1.0, "last_step": "Mean", "last_step_size": 0.04}
    assert d["model"]["sha256"] and d["vae"]["sha256"]
    repa = cao2_describe(handle=cao2_load(options=options(files[0]["repa"][1], files[1]), device=CPU))
    assert repa["data_at_t"] == 0.0 and repa["sampler"] == {"name": "sde", "steps": 250, "guidance": 1.8,
                                                            "cfg_channels": 4, "guidance_interval": [0.0, 0.7]}


@pytest.mark.parametrize("kind,opts,words", [
    ("sit", {"guidance_high": 0.5}, "guidance_high is an option of REPA's samplers, not of SiT's sde sampler"),
    ("repa", {"last_step": "Euler"}, "last_step is an option of SiT's sde sampler, not of REPA's sde sampler"),
    ("sit", {"sampler": "ode", "heun": True}, "heun is an option of REPA's ode sampler"),
    ("repa", {"path": "gvp"}, "repa defines linear, cosine"),
    ("repa", {"sampler": "ode", "heun": True, "prediction": "noise"}, "prediction is an option of SiT's samplers"),
    ("sit", {"timestep_convention": "reference"}, "--timestep-convention is DiT's"),
    ("sit", {"cfg_channels": 5}, "1-4"),
    ("sit", {"sample_steps": 1}, "2 or more"),
    ("sit", {"sampler": "ddim"}, "use sde or ode"),
])
def test_options_of_another_code_are_refused(files, kind, opts, words):
    with pytest.raises(UserError, match=words):
        cao2_load(options=options(files[0][kind][1], files[1], **opts), device=CPU)
