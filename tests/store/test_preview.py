"""The preview's canvas: a label band ("before CLO", "after CLO") above the panels, each row's class name at the
left, the images' pixels unchanged in their place, and the same rows drawn to the same pixels."""
from __future__ import annotations

import numpy as np

from cao2core.store.images import preview_canvas


def _rows(c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (3, 8, 8, c), dtype=np.uint8), rng.integers(0, 256, (3, 8, 8, c), dtype=np.uint8))
            for _ in range(2)]


def _find(canvas: np.ndarray, img: np.ndarray) -> list[tuple[int, int]]:
    h, w = img.shape[:2]
    return [(y, x) for y in range(canvas.shape[0] - h + 1) for x in range(canvas.shape[1] - w + 1)
            if np.array_equal(canvas[y:y + h, x:x + w], img)]


def test_the_canvas_has_labels_and_the_images_in_place():
    for c in (1, 3):
        rows = _rows(c)
        canvas = preview_canvas(rows, pad=2, names=["zero", "a long class name"])
        assert canvas.dtype == np.uint8 and canvas.shape[2] == c
        (y0, x0), = _find(canvas, rows[0][0][0])
        assert y0 > 8 and x0 > 20              # a label band above, a name column at the left
        band, column = canvas[:y0], canvas[y0:, :x0]
        assert (band < 128).any() and (column < 128).any()      # text was drawn in both
        for r, (before, after) in enumerate(rows):
            for j in range(3):
                assert (y0 + r * 10, x0 + j * 10) in _find(canvas, before[j])
                assert _find(canvas, after[j])[0][0] == y0 + r * 10
        assert np.array_equal(canvas, preview_canvas(rows, pad=2, names=["zero", "a long class name"]))


def test_labels_read_before_and_after_over_their_panels():
    rows = [(np.full((2, 8, 8, 1), 255, np.uint8), np.full((2, 8, 8, 1), 255, np.uint8))]
    canvas = preview_canvas(rows, pad=2, names=["x"])[..., 0]
    ink = np.nonzero((canvas < 128).any(axis=0))[0]
    dark_rows = np.nonzero((canvas < 128).any(axis=1))[0]
    assert len(ink) and dark_rows.min() < 8
    # the widest name changes the left column, not the images
    wide = preview_canvas(rows, pad=2, names=["a much wider name"])
    assert wide.shape[1] > canvas.shape[1] and wide.shape[0] == canvas.shape[0]
