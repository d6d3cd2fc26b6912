"""The public API: every example of docs/api.md runs as written, the top level exports what it documents, and the
plugin contract's import paths of the previous release still work."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import cao2core

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_every_example_in_the_api_docs_runs(tmp_path, monkeypatch, capsys):
    """In order, in one namespace, in an empty folder: what a reader pasting them into a notebook gets."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = examples()
    assert len(blocks) >= 9
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    assert "--ipc must be at least 1, got 0" in out and not (tmp_path / "never").exists()
    run, result = namespace["run"], namespace["result"]
    assert run.completed == ["0", "1"] and run.written == 2 and run.failed == {}
    assert sorted(p.name for p in (run.images / "0").iterdir()) == ["0.png", "1.png"]
    assert 0 <= result.accuracy <= 100 and len(result.accuracies) == 2
    assert result.files == [Path("small") / "eval" / "eval.json"]
    assert namespace["refined"].completed == ["0", "1"]
    assert set(namespace["verdict"].difference) == {"hard"}
    assert set(namespace["study"].accuracy) == {"pool", "oss", "clo", "oss+clo"}
    assert [p["point"] for p in namespace["grid"].report["points"]] == ["clo-lr-0.0006", "clo-lr-0.01"]
    assert tuple(namespace["pixels"].shape) == (3, 1, 32, 32)
    assert namespace["shared"].images == 4 and (tmp_path / "small-hf" / "train" / "metadata.jsonl").is_file()
    assert namespace["page"].thumbnails == 4 and (tmp_path / "small" / "report" / "index.html").is_file()
    assert namespace["config"].ipc == 50 and namespace["config"].generator == "dit"


def test_progress_goes_to_the_receiver(tmp_path):
    seen = []
    cao2core.distill(cao2core.RunConfig(classes="0", ipc=1, pool_factor=2, clo_iters=3, out=str(tmp_path / "o")),
                     progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert ("sample pool", 2, 2) in seen and ("CLO", 3, 3) in seen
    assert ("select", 2, 2) in seen and ("decode", 1, 1) in seen
    # the steps before the first sample: (0, 1) when each starts, (1, 1) when it ends
    assert seen[:8] == [(step, done, 1) for step in ("load generator", "load classifier", "hash", "preflight")
                        for done in (0, 1)]
    assert list(dict.fromkeys(stage for stage, _, _ in seen)) == ["load generator", "load classifier", "hash",
                                                                 "preflight", "sample pool", "select", "CLO", "decode"]
    assert all(a != b for a, b in zip(seen, seen[1:]))      # each call says something new
    work = [(stage, done) for stage, done, _ in seen[8:]]
    assert all(done > 0 for _, done in work) and len(work) == len(set(work))


def test_the_top_level_exports_what_it_documents():
    for name in cao2core.__all__:
        assert getattr(cao2core, name) is not None, name
    assert isinstance(cao2core.UserError("x"), Exception)
    with pytest.raises(AttributeError):
        cao2core.not_a_name      # noqa: B018


def test_the_contracts_old_import_paths_still_work():
    """What docs/plugins.md told plugin authors to import, before the package moved."""
    code = ("from cao2core.hookspecs import hookimpl, LatentSpec, SampleOutput, Corrupted, Prediction, GenOption\n"
            "from cao2core.errors import UserError\n"
            "from cao2core.testing import GeneratorConformance, check_generator\n"
            "import cao2core.hookspecs, cao2core.generators.hookspecs, cao2core.testing, cao2core.generators.conformance\n"
            "assert cao2core.hookspecs is cao2core.generators.hookspecs\n"
            "assert cao2core.testing is cao2core.generators.conformance\n")
    subprocess.run([sys.executable, "-c", code], check=True)
