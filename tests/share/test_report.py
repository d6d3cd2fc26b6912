"""`cao2 report`: a finished run as one static page, checked in a real browser (headless chromium, skipped where it
is not installed): every image loads, every in-page link has its target; refusals write nothing."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import cao2core
from cao2core.cli import main

CHECK = """<script>
window.addEventListener('load', function () {
  var broken = Array.from(document.images).filter(function (i) { return i.naturalWidth === 0; }).length;
  var missing = Array.from(document.querySelectorAll('a[href^="#"]')).filter(function (a) {
    return !document.getElementById(decodeURIComponent(a.getAttribute('href').slice(1))); }).length;
  var out = document.createElement('pre'); out.id = 'check';
  out.textContent = 'CHECK images=' + document.images.length + ' broken=' + broken + ' anchors=' +
    document.querySelectorAll('a[href^="#"]').length + ' missing=' + missing + ' END';
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def finished_run(tiny_world, tiny_classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["run", "--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", "0,3,7",
                 "--ipc", "2", "--pool-factor", "2", "--clo-iters", "3", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    return out


def _chromium(url: str, tmp_path, *flags: str) -> str:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *flags, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return done.stdout


def test_the_page_in_a_browser(finished_run, tmp_path, capsys):
    assert main(["report", str(finished_run), "--device", "cpu"]) == 0
    assert "3 classes, 6 images before CLO" in capsys.readouterr().out
    folder = finished_run / "report"
    page = (folder / "index.html").read_text()
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert manifest["generator"]["transformer"]["sha256"] in page and "http" not in page.replace(
        "http-equiv", "")
    for cid in ("0", "3", "7"):
        assert f'<a href="#class-{cid}">' in page and f'id="class-{cid}"' in page
        assert f'src="../images/{cid}/1.png"' in page and f'src="before/{cid}/1.png"' in page
        with Image.open(folder / "before" / cid / "0.png") as thumb:
            assert thumb.size == (32, 32)
        scores = load_file(str(finished_run / "latents" / f"{cid}.safetensors"))["scores"]
        assert f"confidence {scores[0].item():.3f}" in page
    assert page.count("<polyline") == 6 and 'loading="lazy"' in page
    _check_pool_panels(finished_run, page, "pool/{cid}/")
    assert "No evaluation was found" in page
    assert not [p for p in finished_run.iterdir() if p.name.startswith(".report")]

    probe = folder / "probe.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    dom = _chromium(probe.as_uri(), tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    probe.unlink()
    found = re.search(r"CHECK images=(\d+) broken=(\d+) anchors=(\d+) missing=(\d+) END", dom)
    assert found, dom[-2000:]
    images, broken, anchors, missing = map(int, found.groups())
    assert (images, broken, anchors, missing) == (12 + 12, 0, 3, 0)     # after, before, the pools' 3 x 4
    shot = tmp_path / "report.png"
    _chromium((folder / "index.html").as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    assert shot.is_file() and shot.stat().st_size > 0


def _check_pool_panels(run, page: str, base: str) -> None:
    """Every pool sample's cell: its thumbnail, its score, and kept (in order) or the reason it was rejected, as
    the class's latents file records them."""
    assert "rejected: wrong class" in page and "rejected: not in the kept quantile" in page     # the legend
    rejected = 0
    for cid in ("0", "3", "7"):
        t = load_file(str(run / "latents" / f"{cid}.safetensors"))
        with Image.open(run / "report" / "pool" / cid / "3.png") as thumb:
            assert thumb.size == (32, 32)
        for i in range(4):
            rank, reason = int(t["pool_rank"][i]), int(t["pool_reason"][i])
            kind = "kept" if rank >= 0 else {1: "wrong", 2: "out"}[reason]
            cell = re.search(rf'<div class="cell {kind}" title="pool sample {i}: p ([0-9.]+), ([^"]+)">'
                             rf'<img loading="lazy" src="{base.format(cid=cid)}{i}.png"', page)
            assert cell, (cid, i, kind)
            assert cell.group(1) == f"{t['pool_score'][i].item():.3f}"
            assert html.unescape(cell.group(2)) == (f"kept #{rank + 1}" if rank >= 0 else
                                                    "\u2717 wrong class" if reason == 1 else
                                                    "\u2717 not in the kept quantile")
            rejected += rank < 0
    assert rejected == 6


def test_pool_pages_for_a_large_run(finished_run, tmp_path, monkeypatch):
    from cao2core.share import report
    run = tmp_path / "big"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "report", ignore_errors=True)
    monkeypatch.setattr(report, "POOL_INLINE_MAX", 5)          # 12 thumbnails: one page per class
    result = cao2core.report(str(run), device="cpu")
    page = result.page.read_text()
    assert result.pool_thumbnails == 12 and '<a href="pool/3.html">' in page and 'src="pool/' not in page
    pool_page = (run / "report" / "pool" / "3.html").read_text()
    assert "<a href='../index.html#class-3'>" in pool_page
    _check_pool_panels(run, "".join((run / "report" / "pool" / f"{c}.html").read_text() for c in "037"), "{cid}/")
    probe = run / "report" / "pool" / "probe.html"
    probe.write_text(pool_page.replace("</body>", CHECK + "</body>"))
    dom = _chromium(probe.as_uri(), tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    found = re.search(r"CHECK images=(\d+) broken=(\d+)", dom)
    assert found and found.groups() == ("4", "0"), dom[-2000:]


def test_a_damaged_pool_record_is_said_not_shown(finished_run, tmp_path):
    run = tmp_path / "damaged"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "report", ignore_errors=True)
    path = run / "latents" / "3.safetensors"
    tensors = load_file(str(path))
    tensors["pool_thumbs"] = tensors["pool_thumbs"].float()
    save_file(tensors, str(path))
    result = cao2core.report(str(run), device="cpu")
    page = result.page.read_text()
    assert ("not recorded: latents/3.safetensors is damaged: its pool thumbnails are not uint8 images"
            in page) and "3: pool record" in result.missing
    assert 'src="pool/3/' not in page and not (result.out / "pool" / "3").exists() and result.pool_thumbnails == 8


def test_a_run_that_classified_nothing(tiny_world, tmp_path):
    out = tmp_path / "none"
    assert main(["run", "--model", str(tiny_world), "--classes", "4", "--ipc", "2", "--select", "none",
                 "--clo-iters", "0", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    result = cao2core.report(str(out), device="cpu")
    assert ("The pool OSS chose from: not recorded: cao2 run with --select none classifies nothing"
            in html.unescape(result.page.read_text()))
    assert "4: pool record" in result.missing and not (result.out / "pool").exists()


def test_an_older_folder_and_evaluations(finished_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(finished_run, old)
    shutil.rmtree(old / "report", ignore_errors=True)
    for path in (old / "latents").iterdir():       # as an older cao2 wrote it: no loss curves, no pool record
        tensors = {k: v for k, v in load_file(str(path)).items()
                   if not k.startswith(("clo_loss", "pool_")) or k == "pool_index"}
        save_file(tensors, str(path))
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["classes"].values():
        del entry["pool_record"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    compare = {"protocols": [{"protocol": "hard", "distilled": {"mean": 50.0, "std": 1.0},
                              "random_real": {"mean": 40.0, "std": 1.0}, "difference": 10.0,
                              "ior": 10.0, "hlr": 30.0, "ddrs": 0.61}]}
    (old / "eval" / "compare").mkdir(parents=True)
    (old / "eval" / "compare" / "compare.json").write_text(json.dumps(compare))
    result = cao2core.report(str(old), device="cpu")
    page = result.page.read_text()
    assert "not recorded: this run folder has no clo_loss curves" in page and "<polyline" not in page
    assert "0: clo_loss curves" in result.missing and "0: pool record" in result.missing
    assert ("The pool OSS chose from: not recorded: this run folder was written by a cao2 version that did not "
            "record the pool" in page) and not (result.out / "pool").exists()
    assert "<th>DDRS</th>" in page and "0.610" in page and "+10.00" in page
    again = cao2core.report(str(old), device="cpu")         # a second report replaces the first
    assert again.thumbnails == 6 and not [p for p in old.iterdir() if p.name.startswith(".report")]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(cao2core.UserError, match="not a finished cao2 run"):
        cao2core.report(str(empty))
    assert list(empty.iterdir()) == []
    assert main(["report", str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished cao2 run" in err[0]
    assert not (tmp_path / "nowhere").exists()


def test_a_killed_reports_staging_folder_is_swept_by_the_next(finished_run, tmp_path, monkeypatch):
    from cao2core.store import files as store_files
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "report", ignore_errors=True)
    dead = run / ".report.abcd1234"                     # what a SIGKILLed `cao2 report` leaves: no writer holds it
    (dead / "before" / "0").mkdir(parents=True)
    (dead / "before" / "0" / "0.png").write_bytes(b"x")
    monkeypatch.setattr(store_files, "DEBRIS_AGE_S", 0.0)
    cao2core.report(str(run), device="cpu")
    assert not dead.exists() and (run / "report" / "index.html").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".report.")]
