"""Charts for comparison tables (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt


def save_bar_chart(
    rows: dict[str, dict[str, float]],
    categories: Sequence[str],
    path: str | Path,
    ylabel: str,
    title: str = "",
) -> Path:
    """Grouped bars: one group per category (then 'mean'), one bar per model."""
    columns = [*(c for c in categories if c != "mean"), "mean"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(columns)), 4.5))
    for k, (model, scores) in enumerate(rows.items()):
        xs = [i + k * width for i in range(len(columns))]
        ax.bar(xs, [scores.get(c, 0.0) for c in columns], width, label=model)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], columns, rotation=30)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(len(rows), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
