"""The run folder's layout: what ``cao2 run`` writes where, and the names of the temporary files a kill may leave.

    OUT/manifest.json            the run's header and every class's record (written first, rewritten as it goes)
    OUT/images/<class>/<i>.png   the distilled set (an ImageFolder); what else a class folder holds is a
                                 person's (foreign): kept, never a reason to redo the class
    OUT/latents/<class>.safetensors   the kept latents before and after CLO, labels, scores, CLO's loss curves,
                                 and the pool record (pool_*: what the judge said of each pool sample, thumbnails)
    OUT/records/<class>.json     each class's record: status and the sha256 of every file
    OUT/preview.png              the first classes before and after CLO
    OUT/eval/                    what the evaluations write (their names come from the modules that own them)
    OUT/report/                  `cao2 report`'s page (share.report), written from the finished run
"""
from __future__ import annotations

import re

MANIFEST = "manifest.json"
FORMAT = "cao2-run/1"
PREVIEW = "preview.png"
SUBFOLDERS = ("images", "latents", "records")
EVAL_FOLDER = "eval"
REPORT_FOLDER = "report"
IMAGE_NAME = re.compile(r"\d+\.png")
TOKEN = r"[a-z0-9_]{8}"    # the random part of a temporary name (cao2's own, and tempfile's in older runs)
# cao2's temporary names, per folder of a run: what a kill may leave behind
TEMP_NAMES = {
    # .preview.<token>.png: the preview's temporary name in earlier versions
    ".": re.compile(rf"\.((manifest\.json|preview\.png)\.{TOKEN}\.tmp|preview\.{TOKEN}\.png)"),
    "latents": re.compile(rf"\..+\.safetensors\.{TOKEN}\.tmp"),
    "records": re.compile(rf"\..+\.json\.{TOKEN}\.tmp"),
    # images/<class>/: an image written beside files cao2 did not write (a class folder holding a person's files)
    "class": re.compile(rf"\.\d+\.png\.{TOKEN}\.tmp"),
}
STAGING = re.compile(rf"\.[^.].*\.{TOKEN}(\.old\d+)?")     # images/.<class>.<token>: a class folder being written
REPORT_STAGING = re.compile(rf"\.{REPORT_FOLDER}\.{TOKEN}")    # OUT/.report.<token>: a report being written


def eval_files() -> tuple[str, ...]:
    """What cao2's evaluations write in OUT/eval/ by default: ``cao2 eval``'s report and plot, the markers of
    ``cao2 ablate`` and ``cao2 sweep``, and ``cao2 compare``'s reports; ``--overwrite`` removes these and refuses
    anything else there. The names are the owning modules' own (imported when needed: they load torch)."""
    from ..scoring import report
    from ..studies import ablate, compare, sweep
    return (report.REPORT, report.PLOT, ablate.MARKER, sweep.MEASURES, compare.REPORT, compare.TABLE, compare.MARKER)


def eval_temp_name() -> re.Pattern:
    """The temporary names of ``eval_files`` while they are written."""
    return re.compile(rf"\.({'|'.join(map(re.escape, eval_files()))})\.{TOKEN}\.tmp")


def eval_subfolder() -> re.Pattern:
    """The sub-folders of OUT/eval/ that ``cao2 compare`` writes: its own and one per evaluation."""
    from ..studies import compare
    sets = "|".join(map(re.escape, (*compare.SETS, compare.FULL_SET)))
    return re.compile(rf"{compare.FOLDER}(/({sets})-[a-z0-9-]+)?")
