"""A Hugging Face hub cache in its published layout, in a test folder: ``models--owner--name/`` with ``blobs/``
(files named by content hash), ``snapshots/<commit>/`` (links to the blobs, in the repo's paths) and
``refs/main`` (the commit), as ``huggingface_hub`` writes it."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Put ``files`` ({path in the repo: local file}) into ``cache`` as a download of ``repo`` would; returns the
    snapshot folder."""
    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, source in files.items():
        blob = root / "blobs" / hashlib.sha256(Path(source).read_bytes()).hexdigest()
        shutil.copyfile(source, blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot
