"""PNG figures of simulated runs (matplotlib, Agg backend): TTFT CDF, nodes used, SLO-met bars."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def ttft_cdf(results: list[dict], path: Path) -> None:
    """TTFT CDF per run; drops count at +inf, so a curve ends below 1 (§6.1)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ttfts = r["ttft_cdf"]
        finite = [t for t in ttfts if t is not None]
        ax.plot(finite, [(k + 1) / len(ttfts) for k in range(len(finite))], label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def nodes_timeline(results: list[dict], path: Path) -> None:
    """Nodes holding ≥ 1 instance, sampled every second, per device kind."""
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, kind in zip(axes, ("cpu", "gpu")):
        for r in results:
            ax.plot(r["nodes_used"][kind], label=r["label"], linewidth=0.8)
        ax.set_ylabel(f"{kind.upper()} nodes used")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def slo_bars(results: list[dict], path: Path) -> None:
    """SLO-met requests per run (the paper's "serving capacity", Fig. 22)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(results)), 4))
    labels = [r["label"] for r in results]
    ax.bar(range(len(results)), [r["summary"]["slo_met"] for r in results])
    ax.set_xticks(range(len(results)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SLO-met requests")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(results: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "ttft_cdf.png", out / "nodes_used.png", out / "slo_met.png"]
    for fn, p in zip((ttft_cdf, nodes_timeline, slo_bars), paths):
        fn(results, p)
    return paths
