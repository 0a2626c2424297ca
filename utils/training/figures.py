"""Matplotlib figures drawn without a display (the Agg canvas) and saved as PNG atomically, for
the run reports and the sweep plots."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.files import atomic_path


def new_figure(width: float, height: float) -> Figure:
    """A figure of that size in inches, on its own Agg canvas (no pyplot state, no display)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
