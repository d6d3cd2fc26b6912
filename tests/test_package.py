"""The package's own rules: only the CLI parses arguments, and no module reaches into another's private names."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cao2core"


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def test_only_the_cli_parses_arguments():
    offenders = []
    for path, tree in modules():
        if path.name == "cli.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                    alias.name == "argparse" for alias in node.names) or (
                    isinstance(node, ast.ImportFrom) and node.module == "argparse"):
                offenders.append(str(path.relative_to(PACKAGE)))
            if isinstance(node, ast.Attribute) and node.attr in ("parse_args", "parse_known_args"):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_no_module_imports_another_modules_private_names():
    """A private submodule may be imported by its own package; a private name never crosses modules."""
    offenders = []
    for path, tree in modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            own_package = node.level == 1 and node.module is None and path.name == "__init__.py"
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and not own_package:
                    offenders.append(f"{path.relative_to(PACKAGE)}: {alias.name}")
    assert offenders == []


def test_every_package_folder_is_installed():
    """An editable install finds a sub-package pyproject forgot; a wheel would not ship it."""
    root = PACKAGE.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()
