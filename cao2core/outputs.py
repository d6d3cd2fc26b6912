"""Checks of the folders a command writes, made before any work: a name the file system takes, a place the user
may write, and no output inside an input (or an input inside the output). Imports no torch."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError, reason

NAME_MAX = 255      # bytes in one path component on common file systems (ext4, xfs, btrfs, APFS, NTFS in UTF-16)


def check_name(text: str, what: str) -> None:
    """``text`` (a path given by the user, ``what`` names it: "--out") can be created: no NUL byte, no part
    longer than the file system takes."""
    if "\0" in text:
        raise UserError(f"{what} contains a NUL byte, which no file name can hold; give another name")
    for part in Path(text).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UserError(f"{what}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes, longer than the "
                            f"{NAME_MAX} a file name can be; give a shorter name")


def check_folder_name(name: str, what: str) -> None:
    """A name that becomes one folder or file name (a class id): printable, and short enough."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UserError(f"{what} {name[:40]!r} contains a control character (NUL, tab, newline...), which cannot "
                        "name a folder; remove it")
    if len(os.fsencode(name)) > NAME_MAX - 32:      # room for a suffix such as ".safetensors" or ".partial"
        raise UserError(f"{what} {name[:40]!r}... is {len(os.fsencode(name))} bytes; a class folder name can be at "
                        f"most {NAME_MAX - 32}; use a shorter id")


def check_writable(out: Path | str, what: str) -> None:
    """``out`` (an output folder, made if missing) can be written: its nearest existing folder takes a file."""
    check_name(str(out), what)
    place = Path(out).absolute()
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise UserError(f"{what} {out}: {place} is a file, not a folder; choose another {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cao2-probe-", dir=place)
    except OSError as exc:
        raise UserError(f"{what} {out} cannot be written ({place}: {reason(exc)}); choose a folder you can write, "
                        f"e.g. {what} /tmp/...") from None
    os.close(fd)
    os.unlink(probe)


def check_apart(source: Path | str, source_what: str, out: Path | str, out_what: str,
                allowed: Path | str | None = None) -> None:
    """The output ``out`` is neither inside the input ``source`` nor holds it (the next run would read what this
    one wrote, or overwrite its own input); ``allowed``: a folder inside ``source`` meant for outputs."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if allowed is not None and dst.is_relative_to(Path(allowed).resolve()):
        return
    if dst.is_relative_to(src):
        raise UserError(f"{out_what} {out} is inside {source_what} {source}: what is written there would be read "
                        f"as input next time; choose an {out_what} outside it")
    if src.is_relative_to(dst):
        raise UserError(f"{source_what} {source} is inside {out_what} {out}; choose an {out_what} that does not "
                        f"hold the input")
