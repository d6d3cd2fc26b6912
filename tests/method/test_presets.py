"""Presets carry the official code's per-dataset settings (reference notes, section 2)."""
import json

import pytest

from cao2core.cli import main
from cao2core.method.presets import PRESETS


@pytest.mark.parametrize("name,pool,order,k,iters,cond", [
    ("woof", 4, "easy", 11, 100, "null"),
    ("nette", 2, "easy", 11, 0, "class"),
    ("in100", 2, "hard", 5, 100, "null"),
    ("in1k-dit", 4, "easy", 11, 100, "null"),
])
def test_dit_presets_match_the_official_scripts(name, pool, order, k, iters, cond):
    o = PRESETS[name].options_for("reference")
    assert (o["pool_factor"], o["order"], o["clo_tmax"], o["clo_iters"], o["condition"]) == (pool, order, k, iters, cond)
    assert o["guidance"] == 2.7 and o["sample_steps"] == 50 and o["clo_lr"] == 6e-4 and o["clo_lambda"] == 10.0
    # the default profile: the same noise levels on the 1000-step scale (the original t of respaced step k)
    grid = [0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224]
    assert PRESETS[name].options_for("default")["clo_tmax"] == grid[k]
    assert "timestep_convention" not in o       # the profile decides it


def test_mar_preset_and_paper_numbers():
    o = PRESETS["in1k-mar"].options
    assert (o["pool_factor"], o["select"], o["sample_steps"], o["guidance"], o["condition"]) == (2, "stability", 32, 2.9, "zero")
    assert PRESETS["woof"].paper == {"IPC10 (ResNet-18)": 45.6, "IPC50 (ResNet-18)": 68.9}
    assert PRESETS["nette-clo"].options["clo_iters"] == 100


def test_presets_command_lists_them(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in PRESETS) and "45.6" in out


def test_preset_is_overridden_by_flags(tiny_args, tmp_path):
    assert main(["run", "--preset", "mnist", *tiny_args, "--ipc", "1"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["ipc"] == 1 and m["config"]["pool_factor"] == 2 and m["config"]["order"] == "easy"


@pytest.mark.parametrize("argv,tmax,profile", [
    (["--preset", "woof"], 224, "default"),
    (["--preset", "woof", "--profile", "reference"], 11, "reference"),
    (["--preset", "in100", "--profile", "reference"], 5, "reference"),
    (["--preset", "woof", "--profile", "reference", "--clo-tmax", "7"], 7, "reference"),
])
def test_profile_chooses_the_presets_t_hat(argv, tmax, profile):
    from cao2core.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["run", *argv]))
    assert (cfg.clo_tmax, cfg.profile, cfg.timestep_convention) == (tmax, profile, None)


def test_profile_in_a_config_file_chooses_the_presets_t_hat(tmp_path):
    from cao2core.cli import build_parser, config_from_args
    (tmp_path / "run.toml").write_text('profile = "reference"\n')
    cfg = config_from_args(build_parser().parse_args(["run", "--preset", "woof", "--config", str(tmp_path / "run.toml")]))
    assert (cfg.clo_tmax, cfg.profile) == (11, "reference")


def test_gen_opt_flags_merge_with_the_presets_by_key():
    from cao2core.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["run", "--preset", "in1k-mar", "--gen-opt", "temperature=0.9"]))
    assert cfg.gen_opt == ["cfg_schedule=linear", "temperature=0.9"]
    cfg = config_from_args(build_parser().parse_args(["run", "--preset", "in1k-mar", "--gen-opt", "cfg_schedule=constant"]))
    assert cfg.gen_opt == ["cfg_schedule=constant"]


@pytest.mark.parametrize("argv,tmax", [
    (["--preset", "woof", "--profile", "reference", "--sample-steps", "4"], 1),
    (["--preset", "woof", "--profile", "reference", "--sample-steps", "100"], 24),
    (["--preset", "in100", "--profile", "reference", "--sample-steps", "100"], 11),
    (["--preset", "woof", "--sample-steps", "100"], 242),         # the original t of respaced step 24 of 100
    (["--preset", "woof", "--timestep-convention", "reference"], 11),
])
def test_presets_t_hat_follows_the_sampling_steps(argv, tmax):
    from cao2core.cli import build_parser, config_from_args
    from cao2core.generators.respacing import space_timesteps
    cfg = config_from_args(build_parser().parse_args(["run", *argv]))
    assert cfg.clo_tmax == tmax and cfg.from_preset["clo_tmax"] == argv[1]
    assert space_timesteps(1000, 100)[24] == 242


def test_a_presets_t_hat_fits_a_few_steps_and_errors_name_the_preset(tiny_args, tmp_path, capsys):
    args = ["--preset", "mnist", *tiny_args, "--timestep-convention", "reference", "--sample-steps", "4"]
    assert main(["run", *args]) == 0                      # the plugin's own derivation (no preset T-hat)
    from cao2core.config import resolve_run_config
    from cao2core.method import engine
    from cao2core.generators.host import Host
    cfg = resolve_run_config("woof", None, model=tiny_args[1], dataset="mnist", profile="reference", sample_steps=4,
                             classes="0", device="cpu", out=str(tmp_path / "w"), classifier=tiny_args[3])
    assert cfg.clo_tmax == 1
    cfg = resolve_run_config("woof", None, model=tiny_args[1], dataset="mnist", profile="reference", sample_steps=50,
                             gen_opt=[], classes="0", device="cpu", out=str(tmp_path / "w"))
    cfg = engine.replace(cfg, sample_steps=4)              # as if the steps came from elsewhere: 11 > 3
    with pytest.raises(engine.UserError, match=r"outside this generator's range 1-3.*\(the value of --preset woof\)"):
        engine.prepare(cfg, Host(), engine.distributed.init("cpu"))
