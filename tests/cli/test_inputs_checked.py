"""Inputs are what they claim and of the right type, checked before anything runs: one line, nothing written."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dit_original as dit
from cao2core.cli import main


def fails(argv, capsys, match):
    """The run refuses in one error line, the last; before it only the progress lines of the steps that began
    ("cao2: load generator: ... ..."), which a log keeps to say where the time went."""
    rc = main(argv)
    *progress, err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err.startswith("cao2: error: "), err
    assert all(line.startswith("cao2: ") and line.endswith(" ...") and "error" not in line for line in progress), \
        progress
    assert match in err, err
    return err


@pytest.mark.parametrize("toml,match", [
    ('overwrite = "false"', "overwrite must be true or false (a TOML boolean, unquoted)"),
    ('progress = "no"', "progress must be true or false"),
    ('ipc = "x"', "ipc must be a whole number or 'all'"),
    ("ipc = 2.5", "ipc must be a whole number"),
    ("clo-iters = 1.5", "clo-iters must be a whole number"),
    ("out = 3", "out must be a string (quoted)"),
    ('clo-lr = "fast"', "clo-lr must be a number"),
    ('select = "best"', "select must be one of confidence, stability, random, none"),
    ("seed = true", "seed must not be a boolean"),
    ("gen-opt = 5", "give KEY=VALUE strings"),
])
def test_config_values_are_typed(tmp_path, capsys, toml, match):
    (tmp_path / "run.toml").write_text(toml + "\n")
    fails(["run", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "o")], capsys, match)
    assert not (tmp_path / "o").exists()


def test_config_lists_and_tables_are_read_as_meant(tmp_path):
    from cao2core.cli import build_parser, config_from_args
    (tmp_path / "run.toml").write_text('classes = [0, 3]\ngen-opt = "autocast=bf16"\noverwrite = true\n')
    cfg = config_from_args(build_parser().parse_args(["run", "--config", str(tmp_path / "run.toml")]))
    assert (cfg.classes, cfg.gen_opt, cfg.overwrite) == ("0,3", ["autocast=bf16"], True)
    (tmp_path / "run.toml").write_text('[gen-opt]\nautocast = "bf16"\nnum_heads = 2\n')
    cfg = config_from_args(build_parser().parse_args(["run", "--config", str(tmp_path / "run.toml")]))
    assert cfg.gen_opt == ["autocast=bf16", "num_heads=2"]


@pytest.mark.parametrize("flags,match", [
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--condition-threshold", "nan"], "--condition-threshold must be an accuracy in [0, 1]"),
    (["--classes", ""], "--classes is empty (an unset shell variable?)"),
    (["--classes", " , "], "--classes is empty"),
    (["--device", "meta"], "not meta"),
    (["--gen-opt", "num_heads=abc"], "--gen-opt num_heads=abc: dit cannot read it"),
    (["--gen-opt", "autocast=fp8"], "--gen-opt autocast=fp8: dit takes one of fp16, bf16, none"),
    (["--gen-opt", "colour=red"], "unknown --gen-opt colour for dit; known: autocast, cfg_channels"),
    (["--classifier-classes", "no-such-list.txt"], "--classifier-classes no-such-list.txt: cannot read it"),
])
def test_flags_are_checked_before_anything_runs(tiny_args, capsys, flags, match, tmp_path):
    fails(["run", *tiny_args, *flags], capsys, match)
    assert not (tmp_path / "out").exists()


def test_mps_is_refused_where_torch_has_none(tiny_args, capsys, tmp_path):
    if torch.backends.mps.is_available():
        pytest.skip("this torch has MPS")
    fails(["run", *tiny_args, "--device", "mps"], capsys, "no usable MPS")


def _int8(state: dict) -> dict:
    """A 'quantized' copy: every large weight as int8, as a file made by mistake would hold."""
    return {k: (v * 50).round().clamp(-127, 127).to(torch.int8) if v.numel() > 64 else v for k, v in state.items()}


def test_int8_original_dit_is_refused(tmp_path, capsys, tiny_world):
    state = _int8(dit.random_state())
    torch.save(state, tmp_path / "dit-int8.pt")
    err = fails(["run", "--model", str(tmp_path / "dit-int8.pt"), "--vae", str(tiny_world / "vae"), "--dataset",
                 "mnist", "--out", str(tmp_path / "o"), "--gen-opt", "num_heads=2"], capsys, "not floating point")
    assert "dit-int8.pt" in err and "int8" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_int8_diffusers_folder_is_refused(tmp_path, capsys, tiny_world, tiny_classifier, component):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    f = world / component / "diffusion_pytorch_model.safetensors"
    save_file(_int8(load_file(str(f))), str(f))
    err = fails(["run", "--model", str(world), "--classifier", str(tiny_classifier), "--out", str(tmp_path / "o")],
                capsys, "not floating point")
    assert f"{component}/diffusion_pytorch_model.safetensors" in err and "I8" in err


def test_int8_classifier_is_refused(tmp_path, capsys, tiny_args, tiny_classifier):
    bad = tmp_path / "judge-int8.safetensors"
    from safetensors import safe_open
    with safe_open(str(tiny_classifier), "pt") as fh:
        meta = fh.metadata()
    save_file(_int8(load_file(str(tiny_classifier))), str(bad), metadata=meta)
    args = list(tiny_args)
    args[args.index("--classifier") + 1] = str(bad)
    fails(["run", *args], capsys, "judge-int8.safetensors: weight")


def test_int8_mar_checkpoint_is_refused(tmp_path, capsys):
    from mar_tiny import make_published
    ckpt, vae, mar_json, vae_json, _ = make_published(tmp_path / "pub")
    blob = torch.load(ckpt, weights_only=False)
    blob["model_ema"] = _int8(blob["model_ema"])
    torch.save(blob, ckpt)
    fails(["run", "--generator", "mar", "--model", str(ckpt), "--vae", str(vae), "--gen-opt", f"preset={mar_json}",
           "--gen-opt", f"vae_config={vae_json}", "--dataset", "mnist", "--out", str(tmp_path / "o")], capsys,
          "not floating point")


def test_misshaped_diffusers_weight_names_the_key(tmp_path, capsys, tiny_world, tiny_classifier):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    f = world / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    key = "transformer_blocks.0.ff.net.2.weight"
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, str(f))
    fails(["run", "--model", str(world), "--classifier", str(tiny_classifier), "--out", str(tmp_path / "o")], capsys,
          f"size mismatch for {key}")


def test_all_zero_original_dit_runs_or_fails_in_one_line(tmp_path, capsys, tiny_world):
    state = {k: (v if k == "pos_embed" else torch.zeros_like(v)) for k, v in dit.random_state().items()}
    torch.save(state, tmp_path / "zero.pt")
    rc = main(["run", "--model", str(tmp_path / "zero.pt"), "--vae", str(tiny_world / "vae"), "--dataset", "mnist",
               "--classes", "0", "--ipc", "1", "--select", "none", "--clo-iters", "2", "--gen-opt", "num_heads=2",
               "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 0 or (len(err.splitlines()) == 1 and err.startswith("cao2: error: ")), err


@pytest.mark.parametrize("command,toml,match", [
    ("run", "clo-iters = 1\nclo_iters = 2", "'clo-iters' and 'clo_iters' are the same option"),
    ("run", 'images = "some/folder"', "'images' is an option of `cao2 refine`, not of `cao2 run`"),
    ("refine", "dry-run = 1", "'dry-run' is an option of `cao2 run`, not of `cao2 refine`"),
    ("refine", "pool-factor = 2", "'pool-factor' is an option of `cao2 run`, not of `cao2 refine`"),
])
def test_config_keys_belong_to_the_command_once(tmp_path, capsys, command, toml, match):
    (tmp_path / "run.toml").write_text(toml + "\n")
    extra = ["--images", str(tmp_path)] if command == "refine" else []
    fails([command, "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "o"), *extra], capsys, match)
    assert not (tmp_path / "o").exists()


def test_config_given_twice_is_refused(tmp_path, capsys):
    (tmp_path / "a.toml").write_text("ipc = 1\n")
    (tmp_path / "b.toml").write_text("ipc = 2\n")
    fails(["run", "--config", str(tmp_path / "a.toml"), "--config", str(tmp_path / "b.toml"), "--out",
           str(tmp_path / "o")], capsys, "--config is given 2 times")
    assert not (tmp_path / "o").exists()
