"""`cao2 --help`, every subcommand's help and `cao2 presets` start without importing torch."""
from __future__ import annotations

import subprocess
import sys

import pytest

SUBCOMMANDS = ["run", "refine", "eval", "compare", "ablate", "sweep", "plugins", "presets"]


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in SUBCOMMANDS], ["presets"]])
def test_help_and_presets_do_not_import_torch(argv):
    code = ("import sys\nfrom cao2core.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'diffusers', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: cao2" in out or "| preset |" in out
    assert out.strip().splitlines()[-1] == "HEAVY []"
