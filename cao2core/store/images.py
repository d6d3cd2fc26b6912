"""The images of a run: pixels to 8-bit arrays and PNG bytes, and the preview's canvas."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C), rounding as torchvision's save_image does."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()



def png_bytes(arr: np.ndarray) -> bytes:
    image = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()



def preview_canvas(rows: list[tuple[np.ndarray, np.ndarray]], pad: int = 2) -> np.ndarray:
    """One row per class: the selected samples before CLO, a gap, the same samples after CLO."""
    h, w, c = rows[0][0].shape[1:]
    n = max(len(b) for b, _ in rows)
    width = (2 * n) * (w + pad) + 3 * pad + w // 2
    canvas = np.full((len(rows) * (h + pad) + pad, width, c), 255, np.uint8)
    for r, (before, after) in enumerate(rows):
        y = pad + r * (h + pad)
        for j, img in enumerate(before):
            x = pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
        for j, img in enumerate(after):
            x = pad + n * (w + pad) + w // 2 + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
    return canvas
