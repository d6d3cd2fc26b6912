"""The images of a run: pixels to 8-bit arrays and PNG bytes, and the preview's canvas."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

PREVIEW_NAME_CHARS = 24      # a class name longer than this is cut in the preview's left column


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounding as torchvision's save_image does."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def thumbnails(pixels: torch.Tensor, longest: int) -> torch.Tensor:
    """[-1, 1] (B, C, H, W) -> uint8 (B, h, w, C) on the CPU, the longest side at most ``longest`` pixels:
    shrunk with an antialiased bilinear filter (never enlarged), rounded as ``to_uint8``."""
    h, w = pixels.shape[-2:]
    x = pixels.detach().float()
    if max(h, w) > longest:
        scale = longest / max(h, w)
        x = torch.nn.functional.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                            mode="bilinear", antialias=True, align_corners=False)
    return torch.from_numpy(to_uint8(x))


def png_bytes(arr: np.ndarray) -> bytes:
    image = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()



def preview_canvas(rows: list[tuple[np.ndarray, np.ndarray]], pad: int = 2, names: list[str] | None = None
                   ) -> np.ndarray:
    """One row per class: the selected samples before CLO, a gap, the same samples after CLO; a band on top labels
    the panels "before CLO" and "after CLO", a column at the left names each row's class (``names``, default the
    row's number). Drawn with PIL's default font, so the same rows give the same pixels."""
    from PIL import ImageDraw, ImageFont

    h, w, c = rows[0][0].shape[1:]
    n = max(len(b) for b, _ in rows)
    names = [str(x)[:PREVIEW_NAME_CHARS] for x in (names if names is not None else range(len(rows)))]
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_h = max(measure.textbbox((0, 0), t, font=font)[3] for t in ("before CLO", "after CLO", *names))
    left = pad + max(int(np.ceil(measure.textlength(t, font=font))) for t in names) + 2 * pad
    top = text_h + 2 * pad
    width = left + (2 * n) * (w + pad) + 3 * pad + w // 2
    image = Image.new("L" if c == 1 else "RGB", (width, top + len(rows) * (h + pad) + pad), 255 if c == 1 else
                      (255, 255, 255))
    draw = ImageDraw.Draw(image)
    ink = 0 if c == 1 else (0, 0, 0)
    draw.text((left + pad, pad), "before CLO", fill=ink, font=font)
    draw.text((left + pad + n * (w + pad) + w // 2, pad), "after CLO", fill=ink, font=font)
    for r, name in enumerate(names):
        draw.text((pad, top + pad + r * (h + pad) + max(0, (h - text_h) // 2)), name, fill=ink, font=font)
    canvas = np.asarray(image, np.uint8).reshape(image.size[1], width, c).copy()
    for r, (before, after) in enumerate(rows):
        y = top + pad + r * (h + pad)
        for j, img in enumerate(before):
            x = left + pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
        for j, img in enumerate(after):
            x = left + pad + n * (w + pad) + w // 2 + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
    return canvas
