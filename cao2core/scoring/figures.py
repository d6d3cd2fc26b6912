"""Figures of the reports (``eval.png``, ``ablation.png``, ``sweep.png``): matplotlib without a display, PNG bytes."""
from __future__ import annotations

import io


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: reports are drawn on machines with no display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png_of(fig) -> bytes:
    """``fig`` laid out tightly, as PNG bytes; the figure is closed (a long study draws many)."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    return buffer.getvalue()
