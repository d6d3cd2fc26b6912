"""Setuptools shim: the package metadata is in pyproject.toml. The native kernels in csrc/ are built by a
later step of the project; until then there is nothing to compile and every machine installs the same way."""
from setuptools import setup

setup()
