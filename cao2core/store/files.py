"""Crash-safe files: a new file or folder under a unique temporary name, written, locked while in use, and renamed
into place; what a killed writer left is recognisable (``abandoned``) and swept by the next run."""
from __future__ import annotations

import contextlib
import errno
try:
    import fcntl
except ImportError:         # Windows: no advisory locks, so a killed run's temporary files stay
    fcntl = None
import os
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

SWAP_TRIES = 10          # renames of a class folder that another process keeps replacing, before giving up
DEBRIS_AGE_S = 0.5        # a temporary name younger than this may not be locked by its writer yet (microseconds)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT until the block is done (main thread only), then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def new_file(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """(fd, path) of a new file with a unique name, created with the mode ``open()`` gives (mkstemp's is 0600)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def new_folder(folder: Path, prefix: str) -> Path:
    """A new folder with a unique name, created with the mode ``mkdir()`` gives (mkdtemp's is 0700)."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def hold_lock(fd: int) -> None:
    """Mark a temporary file or folder as in use for as long as ``fd`` is open: ``sweep_debris`` leaves it."""
    if fcntl is not None:
        with contextlib.suppress(OSError):      # a file system without locks: the sweep then skips it too
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a locked temporary file beside it, synced, renamed."""
    fd, tmp = new_file(path.parent, f".{path.name}.", ".tmp")
    try:
        hold_lock(fd)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_folder(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        hold_lock(fd)
        yield path
    finally:
        os.close(fd)


def abandoned(path: Path) -> bool:
    """A temporary file or folder that no process is writing: a killed run's. Its writer holds a lock on it
    (``hold_lock``); one too young to be locked yet, or one on a file system without locks, counts as in use."""
    if fcntl is None:
        return False
    try:
        if time.time() - path.lstat().st_mtime < DEBRIS_AGE_S:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def swap_in(staging: Path, final: Path) -> None:
    """Rename the complete folder ``staging`` to ``final``. A folder already there (an interrupted attempt, or
    another process writing the same class at this moment) is first renamed aside and removed after: no step
    fails because the other process got there first."""
    asides = []
    try:
        for n in range(SWAP_TRIES):
            try:
                os.rename(staging, final)
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
            aside = staging.with_name(f"{staging.name}.old{n}")
            try:
                os.rename(final, aside)
                asides.append(aside)
            except FileNotFoundError:
                pass                # the other process moved it aside first
        raise OSError(errno.EBUSY, f"{final} kept being replaced by another process")
    finally:
        for aside in asides:
            remove_path(aside)


def write_files(out: Path, files: dict[str, bytes | None]) -> list[Path]:
    """Write ``{name: bytes}`` into ``out`` (None = skip) together: everything is rendered before the call, then
    each file is staged and renamed into place, so an error leaves no partial file behind (and removes ``out`` if
    this call created it)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            if data is None:
                continue
            fd, tmp = new_file(out, f".{name}.", ".tmp")       # the umask's mode: reports are made to be shared
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            staged.append((tmp, out / name))
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return [final for _, final in staged]
