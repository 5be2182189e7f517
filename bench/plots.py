"""The report's plots (matplotlib, Agg): F1 vs context positions, TTFT vs k, peak RSS per backend."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

PLOTS = ("f1_vs_context.png", "ttft_vs_k.png", "rss_per_backend.png")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend: bool = False) -> None:
    """Labels, grid, optional legend; save to `path` and free the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=7, loc="best")
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def f1_vs_context(rows: Sequence[dict], path: Path) -> None:
    """One point per method (and rate): mean F1 over the dev sets vs mean context positions (log x)."""
    plt = _pyplot()
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("f1") is not None and r.get("context_positions") is not None:
            by_method[r["method"]].append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, rs in by_method.items():
        x = sum(r["context_positions"] for r in rs) / len(rs)
        y = sum(r["f1"] for r in rs) / len(rs)
        mean = ax.scatter([x], [y], s=60, label=f"{method} (mean of {len(rs)} sets)")
        ax.scatter([r["context_positions"] for r in rs], [r["f1"] for r in rs], s=12, alpha=0.3,
                   color=mean.get_facecolor()[0])
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    _finish(plt, fig, ax, path, "context positions the generator reads (log)", "F1 (0-100)",
            "Answer F1 vs context size (small dots: one dev set)", legend=bool(by_method))


def _cold(row: dict) -> dict:
    """The row's TTFT of a whole prefill: latency rows keep it apart from the warm one (the chat head reused from
    the question before), llama.cpp's anchor resets its cache before every question."""
    if "ttft_cold_s" not in row:
        return row
    return {**row, "ttft_s": row["ttft_cold_s"], "ttft_std_s": row.get("ttft_cold_std_s")}


def ttft_vs_k(latency: Sequence[dict], anchor: Sequence[dict], path: Path) -> None:
    """Cold TTFT (mean ± std) vs k, one line per (method, backend); configurations over the context marked x."""
    plt = _pyplot()
    series: dict[str, list[dict]] = defaultdict(list)
    for r in [*map(_cold, latency), *anchor]:
        if r.get("k") is not None:
            series[f"{r['method']} / {r['backend']}"].append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max([r["ttft_s"] + (r.get("ttft_std_s") or 0) for rs in series.values() for r in rs
               if r.get("ttft_s") is not None] or [1.0])
    for label, rs in series.items():
        done = sorted((r for r in rs if r.get("ttft_s") is not None), key=lambda r: r["k"])
        over = [r for r in rs if r.get("ttft_s") is None and "exceeds context" in (r.get("note") or "")]
        if not done and not over:
            continue
        line = ax.errorbar([r["k"] for r in done], [r["ttft_s"] for r in done],
                           yerr=[r.get("ttft_std_s") or 0 for r in done], marker="o", capsize=3, label=label)
        color = line[0].get_color()
        for r in over:
            ax.scatter([r["k"]], [top * 1.3], marker="x", s=60, color=color)
            ax.annotate("exceeds context", (r["k"], top * 1.3), textcoords="offset points", xytext=(-75, 6),
                        fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _finish(plt, fig, ax, path, "documents k (log)", "time to first token, s (log; generator level)",
            "TTFT of a whole prefill vs k (x: the prompt does not fit the context)", legend=bool(series))


def rss_per_backend(workers: Sequence[dict], path: Path) -> None:
    """Peak RSS of each latency worker process (model load + compression + every k)."""
    plt = _pyplot()
    labels = [f"{w['backend']}\n{w['method']}" for w in workers]
    values = [w["peak_rss_mb"] for w in workers]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) + 2), 4))
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    if not values:
        ax.text(0.5, 0.5, "no backend ran", ha="center", va="center", transform=ax.transAxes)
    _finish(plt, fig, ax, path, "", "peak RSS, MB", "Peak resident memory per backend (one process each)")


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """The plots the report has data for (accuracy: F1 vs context; latency: TTFT vs k, RSS per backend)."""
    out_dir = Path(out_dir)
    written = []
    if report.get("accuracy"):
        f1_vs_context(report["accuracy"], out_dir / PLOTS[0])
        written.append(out_dir / PLOTS[0])
    if report.get("latency"):
        ttft_vs_k(report["latency"], report.get("anchor", []), out_dir / PLOTS[1])
        rss_per_backend(report.get("latency_workers", []), out_dir / PLOTS[2])
        written += [out_dir / PLOTS[1], out_dir / PLOTS[2]]
    return written
