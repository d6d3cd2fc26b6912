"""The dit plugin's own inputs, checked before any weights load: the step count and a world's cao2.json."""
from __future__ import annotations

import shutil

import pytest

from cao2core.cli import main
from cao2_dit import loading


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Loading the transformer fails the test: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("the transformer was loaded before the options were checked")
    monkeypatch.setattr(loading, "load_transformer", refuse)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cao2: error: "), err
    return err


@pytest.mark.parametrize("steps", ["5000", "1001"])
def test_too_many_sample_steps_is_the_users_flag_with_the_range(tiny_args, capsys, no_weights_loaded, steps):
    assert main(["run", *tiny_args, "--sample-steps", steps]) == 2
    err = _one_line(capsys)
    assert f"--sample-steps {steps}" in err and "from 1 to 1000" in err and "report it" not in err, err


@pytest.mark.parametrize("text,match", [
    ('{"label_space": "mnist",', "is not valid JSON"),
    ('["mnist"]', "should hold a JSON object"),
    ('{"sample_steps": "fifty"}', "sample_steps is 'fifty'; it should be a whole number"),
    ('{"sample_steps": 5000}', "sample_steps in"),
    ('{"guidance": "high"}', "guidance is 'high'; it should be a number"),
])
def test_a_broken_cao2_json_names_the_file(tiny_world, tiny_args, tmp_path, capsys, no_weights_loaded, text, match):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    (world / "cao2.json").write_text(text)
    args = [*tiny_args]
    args[args.index("--model") + 1] = str(world)
    assert main(["run", *args]) == 2
    err = _one_line(capsys)
    assert str(world / "cao2.json") in err and match in err and "report it" not in err, err
