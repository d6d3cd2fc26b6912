"""The pool record: what OSS saw of every pool sample (score, the judge's top class, kept and in which order, why
not), and small thumbnails of the pool from the decode the judge saw, stored with the class within its budget."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cao2core.cli import main
from cao2core.method import oss
from cao2core.store.images import thumbnails, to_uint8

POOL_FIELDS = {"pool_score", "pool_pred", "pool_pred_prob", "pool_rank", "pool_reason", "pool_thumbs",
               "pool_thumb_index"}
# pool of 6 over 3 classes, target class 1 (as in test_oss)
PROBS = torch.tensor([[0.1, 0.8, 0.1],     # 0 right class, .8
                      [0.7, 0.2, 0.1],     # 1 wrong class (0)
                      [0.3, 0.6, 0.1],     # 2 right class, .6
                      [0.05, 0.9, 0.05],   # 3 right class, .9
                      [0.1, 0.1, 0.8],     # 4 wrong class (2)
                      [0.4, 0.5, 0.1]])    # 5 right class, .5
THUMBS = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1, 1).expand(6, 2, 2, 1)


def test_confidence_reasons_by_hand():
    keep = oss.select_confidence(PROBS, 1, 2, "easy")
    assert keep.tolist() == [3, 0]
    r = oss.pool_record(PROBS, 1, keep, oss.scores_of(PROBS, 1), True, THUMBS)
    assert set(r) == POOL_FIELDS
    assert r["pool_rank"].tolist() == [1, -1, -1, 0, -1, -1]
    # 1 and 4: the judge's top class is not 1; 2 and 5: class 1, ranked below the kept two
    assert r["pool_reason"].tolist() == [oss.KEPT, oss.WRONG_CLASS, oss.RANKED_OUT, oss.KEPT, oss.WRONG_CLASS,
                                         oss.RANKED_OUT]
    assert r["pool_pred"].tolist() == [1, 0, 1, 1, 2, 1]
    torch.testing.assert_close(r["pool_pred_prob"], torch.tensor([0.8, 0.7, 0.6, 0.9, 0.8, 0.5]))
    torch.testing.assert_close(r["pool_score"], PROBS[:, 1])
    assert r["pool_thumb_index"].tolist() == list(range(6)) and torch.equal(r["pool_thumbs"], THUMBS)


def test_stability_rejects_by_rank_only():
    before = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]])
    final = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.0, 0.1, 0.9]])
    keep = oss.select_stability(before, final, 2)
    r = oss.pool_record(final, 1, keep, oss.stability_of(before, final), False, THUMBS[:4])
    assert sorted(keep.tolist()) == [0, 3]         # kept although the judge says class 0 and 2: not checked
    assert r["pool_reason"].tolist() == [oss.KEPT, oss.RANKED_OUT, oss.RANKED_OUT, oss.KEPT]
    assert r["pool_pred"].tolist() == [0, 2, 1, 2]


def test_the_thumbnail_budget_keeps_the_kept_first():
    keep = torch.tensor([3, 0])
    r = oss.pool_record(PROBS, 1, keep, oss.scores_of(PROBS, 1), True, THUMBS, thumbs_max=3)
    assert r["pool_thumb_index"].tolist() == [0, 1, 3]        # both kept, then the first rejected in pool order
    assert r["pool_thumbs"][:, 0, 0, 0].tolist() == [0, 1, 3]
    assert len(r["pool_score"]) == 6                           # the scores of every sample are kept
    r = oss.pool_record(PROBS, 1, keep, oss.scores_of(PROBS, 1), True, THUMBS, thumbs_max=1)
    assert r["pool_thumb_index"].tolist() == [3]


def test_thumbnails_shrink_antialiased_and_never_grow():
    # a 1-pixel checker of -1 and 1 shrunk by 3: plain bilinear sampling would pick single pixels (black or white)
    checker = (torch.arange(96).reshape(1, 96) + torch.arange(72).reshape(72, 1)) % 2 * 2.0 - 1
    small = thumbnails(checker.expand(2, 3, 72, 96), 32)
    assert small.shape == (2, 24, 32, 3) and small.dtype == torch.uint8
    assert (small[:, 1:-1, 1:-1].int() - 128).abs().max() <= 2         # antialiased: it averages to grey
    tiny = torch.rand(1, 1, 28, 20) * 2 - 1
    assert torch.equal(thumbnails(tiny, 32), torch.from_numpy(to_uint8(tiny)))


def _run(tiny_world, tiny_classifier, out: Path, *extra: str, capsys=None) -> None:
    assert main(["run", "--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", "0,1,5",
                 "--ipc", "2", "--pool-factor", "4", "--clo-iters", "2", "--out", str(out), "--no-progress",
                 "--device", "cpu", *extra]) == 0


@pytest.fixture(scope="module")
def confidence_run(tiny_world, tiny_classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool") / "out"
    _run(tiny_world, tiny_classifier, out)
    return out


def test_a_run_records_the_pool(confidence_run, tiny_world):
    from cao2core.generators.host import Host

    reasons = set()
    for cid in ("0", "1", "5"):
        t = load_file(str(confidence_run / "latents" / f"{cid}.safetensors"))
        record = json.loads((confidence_run / "records" / f"{cid}.json").read_text())
        pool = record["pool_record"]
        assert set(pool["fields"]) == POOL_FIELDS <= set(t)
        assert pool["select"] == "confidence" and pool["target"] == int(cid) and pool["thumbnails"] == 8
        assert pool["capped"] is False and pool["thumbnail_px"] == 32
        assert pool["reasons"] == {"0": "kept", "1": "wrong class", "2": "not in the kept quantile"}
        assert len(t["pool_score"]) == record["pool"] == 8
        # the kept ones, in selection order, are the class's samples, with the scores the class records
        rank = t["pool_rank"]
        assert [int((rank == k).nonzero()) for k in range(2)] == t["pool_index"].tolist()
        torch.testing.assert_close(t["pool_score"][t["pool_index"]], t["scores"])
        for i in range(8):      # each rejection's reason, from the recorded judge's answer
            kept, pred, reason = int(rank[i]) >= 0, int(t["pool_pred"][i]), int(t["pool_reason"][i])
            expected = oss.KEPT if kept else oss.WRONG_CLASS if pred != int(cid) else oss.RANKED_OUT
            assert reason == expected
            reasons.add(reason)
            assert t["pool_pred_prob"][i] >= t["pool_score"][i] - 1e-6       # the top class is the most probable
        # the thumbnails are the pool's decode (32 px: not resized), the kept ones those of latents_init
        assert t["pool_thumbs"].shape == (8, 32, 32, 1) and t["pool_thumb_index"].tolist() == list(range(8))
        gen = Host().generator("dit")
        handle = gen.load(options=gen.parse_options({"model": str(tiny_world)}), device=torch.device("cpu"))
        decoded = torch.from_numpy(to_uint8(gen.decode(handle=handle, latents=t["latents_init"])))
        assert (decoded.int() - t["pool_thumbs"][t["pool_index"]].int()).abs().max() <= 1
    assert reasons == {oss.KEPT, oss.WRONG_CLASS, oss.RANKED_OUT}
    m = json.loads((confidence_run / "manifest.json").read_text())
    assert m["classes"]["0"]["pool_record"]["fields"] == sorted(POOL_FIELDS)


def test_the_cap_is_recorded(tiny_world, tiny_classifier, tmp_path, monkeypatch):
    monkeypatch.setattr(oss, "POOL_THUMBS_MAX", 3)
    _run(tiny_world, tiny_classifier, tmp_path / "out")
    t = load_file(str(tmp_path / "out" / "latents" / "5.safetensors"))
    pool = json.loads((tmp_path / "out" / "records" / "5.json").read_text())["pool_record"]
    assert pool["capped"] is True and pool["thumbnails"] == 3 and len(t["pool_thumbs"]) == 3
    assert set(t["pool_index"].tolist()) < set(t["pool_thumb_index"].tolist()) and len(t["pool_score"]) == 8


@pytest.mark.parametrize("select", ["stability", "random", "none"])
def test_other_selections(tiny_world, tiny_classifier, tmp_path, select):
    _run(tiny_world, tiny_classifier, tmp_path / "out", "--select", select)
    t = load_file(str(tmp_path / "out" / "latents" / "1.safetensors"))
    record = json.loads((tmp_path / "out" / "records" / "1.json").read_text())
    if select == "stability":
        assert record["pool_record"]["select"] == "stability" and POOL_FIELDS <= set(t)
        assert set(t["pool_reason"].tolist()) == {oss.KEPT, oss.RANKED_OUT}     # never rejected for its class
        torch.testing.assert_close(t["pool_score"][t["pool_index"]], t["scores"])
    else:       # nothing was classified: nothing recorded
        assert "pool_record" not in record and not any(k.startswith("pool_") and k != "pool_index" for k in t)


def test_an_older_folder_without_the_record_is_not_redone(confidence_run, tiny_world, tiny_classifier, tmp_path,
                                                          capsys):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(confidence_run, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for cid in ("0", "1", "5"):         # as an older cao2 wrote it: no pool tensors, no pool_record
        path = old / "latents" / f"{cid}.safetensors"
        save_file({k: v for k, v in load_file(str(path)).items() if k == "pool_index" or not k.startswith("pool_")},
                  str(path), metadata={"cao2": json.dumps({"class": cid, "run_id": manifest["run_id"]})})
        record = json.loads((old / "records" / f"{cid}.json").read_text())
        del record["pool_record"]
        record["files"]["latents"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (old / "records" / f"{cid}.json").write_text(json.dumps(record))
        manifest["classes"][cid] = record
    (old / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in (old / "latents").iterdir()}
    capsys.readouterr()
    _run(tiny_world, tiny_classifier, old)
    assert "distilled 0 classes (3 already complete)" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (old / "latents").iterdir()} == before
