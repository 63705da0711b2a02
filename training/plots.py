"""The few-shot accuracy figure `pal eval` draws (one run: training.evaluate; over seeds: training.seeds)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def model_label(key: str) -> str:
    """A report's model key as the legend names it: "3" -> "K=3", "served" stays."""
    return f"K={key}" if key.isdigit() else key


@contextmanager
def fewshot_axes(
    shots: Sequence[int],
    path: Path,
    title: str,
    figsize: tuple[float, float] = (6, 4),
    title_size: float | None = None,
    legend_size: float = 8,
) -> Iterator[Any]:  # matplotlib Axes
    """Axes for accuracy against shots (log scale); the caller draws each model's lines in the block, and the
    figure is written to `path` when it ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.set_xscale("log")
        ax.set_xticks(list(shots), [str(n) for n in shots])
        ax.set_xlabel("shots (comparisons of the unseen user)")
        ax.set_ylabel("accuracy on held-out pairs")
        ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
