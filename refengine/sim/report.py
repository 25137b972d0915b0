"""Text renderings of simulated runs: the stdout summary table and Markdown tables for the docs."""
from __future__ import annotations

COLUMNS = [
    # header, summary key, format
    ("SLO-met", "slo_met", "{:d}"),
    ("rate", "slo_met_rate", "{:.1%}"),
    ("no grace", "slo_met_no_grace", "{:d}"),
    ("dropped", "dropped", "{:d}"),
    ("left", "cancelled", "{:d}"),
    ("evicted", "evictions", "{:d}"),
    ("migrated", "migrations", "{:d}"),
    ("TTFT p50 s", "ttft_p50_s", "{:.2f}"),
    ("TTFT p99 s", "ttft_p99_s", "{:.2f}"),
    ("startup s", "startup_mean_s", "{:.2f}"),
    ("CPU used", "cpu_nodes_used", "{:.2f}"),
    ("GPU used", "gpu_nodes_used", "{:.2f}"),
    ("CPU tok/node·s", "cpu_decode_tok_per_node_s", "{:.0f}"),
    ("GPU tok/node·s", "gpu_decode_tok_per_node_s", "{:.0f}"),
    ("GPU batch", "gpu_mean_batch", "{:.1f}"),
    ("GPU mem util", "gpu_mem_util", "{:.2f}"),
    ("resize share", "kv_resize_share", "{:.2%}"),
    ("sched p50 µs", "sched_p50_us", "{:.1f}"),
    ("sched p99 µs", "sched_p99_us", "{:.1f}"),
]


def _cell(fmt: str, value) -> str:
    if value is None:
        return "inf"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def rows(results: list[dict], columns=COLUMNS) -> tuple[list[str], list[list[str]]]:
    header = ["run"] + [c[0] for c in columns] + ["wall s"]
    body = [[r["label"]] + [_cell(fmt, r["summary"].get(key)) for _, key, fmt in columns]
            + [f"{r['wall_s']:.1f}"] for r in results]
    return header, body


def summary_table(results: list[dict]) -> str:
    """Fixed-width table for the terminal."""
    header, body = rows(results)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(out)
