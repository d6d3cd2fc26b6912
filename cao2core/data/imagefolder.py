"""Reading ImageFolder trees (``DIR/<class>/*.png``): class folders, their images in natural order, folder-name
matching, and one image as a uint8 tensor.

Images keep their full range: 16-bit (and 16-bit-valued 32-bit) greyscale is scaled to 8 bits, float greyscale
is read as [0, 1]; one whose values fit no such range is refused. An image larger than PIL decodes safely
(``Image.MAX_IMAGE_PIXELS``, a decompression bomb) is refused. Every refusal is one ``UserError`` naming the file.
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError, reason
from .labels import imagenet1k

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")     # one channel, more than 8 bits per sample
UINT16_MAX = 65535


def norm_name(name: str) -> str:
    """A class name as folder names and label spaces are compared: lower case, runs of space/_/- as one space."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def natural_key(path: Path):
    """Sort key: ``2.png`` before ``10.png``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


@functools.lru_cache(maxsize=None)
def human_names() -> dict[str, str]:
    """Normalised ImageNet class name (any synonym) -> wnid."""
    wnids, names = imagenet1k()
    table: dict[str, str] = {}
    for wnid, line in zip(wnids, names):
        for synonym in line.split(","):
            table.setdefault(norm_name(synonym), wnid)
    return table


def class_folders(root: Path, role: str) -> dict[str, Path]:
    """The class folders of an ImageFolder tree (hidden folders are skipped)."""
    if not root.is_dir():
        raise UserError(f"{role} folder {root} not found; give a folder of class folders (DIR/<class id>/*.png)")
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not folders:
        loose = any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir() if p.is_file())
        raise UserError(f"{role} folder {root} has {'images but ' if loose else ''}no class folders; "
                        "expected DIR/<class id>/*.png (ImageNet val layout)")
    return folders


def image_files(folder: Path) -> list[Path]:
    """The image files of a class folder in natural order (hidden and other files are skipped)."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not p.name.startswith(".")), key=natural_key)


def _refuse(what: str, role: str, fix: str = "remove or replace it") -> UserError:
    return UserError(f"{role + ': ' if role else ''}{what}; {fix}")


def _open(path: Path, role: str) -> Image.Image:
    """``Image.open`` that refuses a decompression bomb (PIL only warns below twice its limit)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _refuse(f"{path} is too large to decode safely ({reason(exc)})", role) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _refuse(f"cannot read {path} ({reason(exc)})", role) from None


def _eight_bit(im: Image.Image, path: Path, role: str) -> Image.Image:
    """A one-channel image of more than 8 bits as mode ``L``, its full range scaled (PIL's convert clips it)."""
    values = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        scale = 255.0
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise _refuse(f"{path} holds floating-point values outside [0, 1], which have no known "
                          "brightness scale", role, "save it as an 8- or 16-bit image")
    else:
        scale = 255.0 / UINT16_MAX
        if values.size and (values.min() < 0 or values.max() > UINT16_MAX):
            raise _refuse(f"{path} holds 32-bit values outside the 16-bit range, which have no known "
                          "brightness scale", role, "save it as an 8- or 16-bit image")
    return Image.fromarray(np.round(values * scale).astype(np.uint8), "L")


def check_image(path: Path, role: str = "") -> tuple[int, int]:
    """(width, height) of a readable image file, refused as ``read_image`` would refuse it."""
    with _open(path, role) as im:
        try:
            im.verify()
        except (OSError, SyntaxError, ValueError) as exc:
            raise _refuse(f"cannot read {path} ({reason(exc)})", role) from None
        size, wide = im.size, im.mode in WIDE_MODES
    if wide:        # the range is known only once decoded
        read_image(path, 1, role)
    return size


def read_image(path: Path, channels: int, role: str = "") -> Image.Image:
    """The decoded image as mode ``L`` (``channels`` 1) or ``RGB`` (3), 8 bits per sample."""
    with _open(path, role) as im:
        try:
            im.load()
            if im.mode in WIDE_MODES:
                im = _eight_bit(im, path, role)
            return im.convert("L" if channels == 1 else "RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise _refuse(f"cannot read {path} ({reason(exc)})", role) from None


def load_image(path: Path, channels: int, size: int, crop_pct: float = 1.0, role: str = "") -> torch.Tensor:
    """uint8 (C, size, size): short side resized to size / crop_pct (bilinear, antialiased), centre crop."""
    im = read_image(path, channels, role)
    if im.size != (size, size) or crop_pct != 1.0:
        short = round(size / crop_pct)
        w, h = im.size
        scale = short / min(w, h)
        im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())
