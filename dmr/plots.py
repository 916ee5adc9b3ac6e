"""Figures: matplotlib without a display, written as PNG + PDF side by side."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # jobs run headless, on cluster nodes too
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """`path` with .png and .pdf suffixes; the figure is closed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".png"), dpi=150)
    fig.savefig(path.with_suffix(".pdf"))
    pyplot().close(fig)
