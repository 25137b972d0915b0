"""PNG figures of engine benchmarks (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def tokens_vs_batch(series: dict[str, dict[int, dict[int, float]]], bounds: dict[int, dict[int, float]],
                    path: Path, title: str) -> None:
    """Decode tokens/s vs batch size, one panel per context, one line per engine, the bound dashed.

    series: engine -> context -> batch -> tokens/s; bounds: context -> batch -> tokens/s.
    """
    contexts = sorted(bounds)
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.5 * len(contexts), 4.2), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for engine, by_context in series.items():
            points = sorted(by_context.get(context, {}).items())
            ax.plot([b for b, _ in points], [v for _, v in points], marker="o", label=engine)
        limit = sorted(bounds[context].items())
        ax.plot([b for b, _ in limit], [v for _, v in limit], "k--", linewidth=1, label="bandwidth bound")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"context {context}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
