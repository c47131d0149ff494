"""One figure style for every analysis: sizes, task colours, layer axes, saving.

Why a module: the studies, notebooks and README figures should look like one
paper. Headless machines fall back to matplotlib's Agg backend by themselves;
notebooks keep their inline backend.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

DPI = 110


def figure(nrows: int = 1, ncols: int = 1, *, width: float = 4.2, height: float = 3.2, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure with ``nrows × ncols`` axes (always a 2-D array), house style, per-panel size in inches.

    The figure is not registered with pyplot: notebooks show it once (when returned) instead of twice,
    and long studies do not accumulate open figures.
    """
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    for ax in axes.flat:
        _style(ax)
    return fig, axes


def _style(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, alpha=0.25)
    ax.tick_params(labelsize=8)
    ax.xaxis.label.set_size(9)
    ax.yaxis.label.set_size(9)
    ax.title.set_size(10)


def task_colors(tasks: Sequence[str]) -> dict[str, Any]:
    """A stable colour per task (tab10 order of first appearance)."""
    cmap = plt.get_cmap("tab10")
    return {t: cmap(i % 10) for i, t in enumerate(dict.fromkeys(tasks))}


def layer_axis(ax: Any, layers: Sequence[int], axis: str = "x", label: str = "layer") -> None:
    """Integer layer ticks (at most ~16 labels) and the axis label."""
    layers = list(layers)
    step = max(1, len(layers) // 15 + (len(layers) % 15 > 0)) if len(layers) > 16 else 1
    ticks = layers[::step]
    if axis == "x":
        ax.set_xticks(ticks)
        ax.set_xlabel(label)
    else:
        ax.set_yticks(ticks)
        ax.set_ylabel(label)


def model_label(model_id: str) -> str:
    """Short model name for titles (last path component)."""
    return Path(str(model_id)).name or str(model_id)


def save(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Save as PNG (or the suffix's format; folders created) through the one atomic writer; closes the figure."""
    from .store import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())
