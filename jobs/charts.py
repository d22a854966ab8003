"""PNG charts drawn with matplotlib's Agg renderer (no display, no pyplot state).

    python -m jobs.charts assets/demo-pair   # -> assets/demo-pair/training_curves.png

`line_chart(panels, path)` draws one panel per (title, {series name: [(x, y), ...]}, log_y
[, (y_min, y_max)[, y_label[, x_label]]]) side by side; used for the demo pair's training curves.
`bar_chart(counts, path)` draws one bar per key (`specllava stats --plot`).
`bench_chart(runs, best, speedups, path)` draws `specllava bench`'s tokens/s grouped by batch size,
each method's best bar outlined and labelled.

Figures are built with `matplotlib.figure.Figure` on an explicit Agg canvas rather than through
pyplot, which matplotlib recommends outside interactive sessions: nothing is shown, no global
backend is switched and no figure is kept alive after its PNG is written.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DPI = 100
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#000000"]
BENCH_COLORS = {"target_greedy": "#7f7f7f", "hf_assisted": "#d62728", "static_tree": "#1f77b4",
                "dynamic_tree": "#2ca02c", "hf_static": "#ff7f0e", "plain_engine": "#9467bd",
                "dynamic_stream": "#17becf", "plain_stream": "#bcbd22"}


def _figure(width: int, height: int, ncols: int = 1):
    """(figure, axes list) of `width` x `height` pixels on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")


def _no_data(ax, what: str = "no data") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _leading_digit(value: float) -> int:
    """The first significant digit of a positive number (labels 2 and 5 of a log axis's minor ticks)."""
    return int(f"{value:e}"[0]) if value > 0 else 0


def line_chart(panels: list[tuple], path: str | Path, width: int = 460, height: int = 360) -> None:
    """panels: (title, {name: [(x, y), ...]}, log_y[, (y_min, y_max) or None[, y_label[, x_label]]]),
    one panel of `width` x `height` pixels each, side by side. Writes a PNG to `path`."""
    fig, axes = _figure(width * max(1, len(panels)), height, max(1, len(panels)))
    for ax, (title, series, log_y, *rest) in zip(axes, panels):
        ylim, y_label, x_label = (list(rest) + [None, None, None])[:3]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_label or "training step")
        if y_label:
            ax.set_ylabel(y_label)
        drawn = 0
        for k, (name, points) in enumerate(series.items()):
            pts = [(x, y) for x, y in points if y is not None and (not log_y or y > 0)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=PALETTE[k % len(PALETTE)], linewidth=1.6, label=name,
                    marker="o" if len(pts) < 20 else None, markersize=4)
            drawn += 1
        if not drawn:
            _no_data(ax)
            continue
        if log_y:
            from matplotlib.ticker import FuncFormatter
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")   # 0.3, 2, not 3x10^-1, 2x10^0
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _leading_digit(v) in (2, 5) else ""))
        if ylim:
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, ylim[0]), max(hi, ylim[1]))
        ax.grid(True, which="major", alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    _save(fig, path)


def bar_chart(counts: dict, path: str | Path, title: str = "", x_label: str = "", y_label: str = "",
              width: int = 520, height: int = 320) -> None:
    """One bar per key of `counts` (sorted), heights labelled; writes a PNG to `path`."""
    fig, (ax,) = _figure(width, height)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    keys = sorted(counts)
    if not keys:
        _no_data(ax)
        _save(fig, path)
        return
    positions = list(range(len(keys)))
    bars = ax.bar(positions, [counts[k] for k in keys], color=PALETTE[0], width=0.7)
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_xticks(positions, [str(k) for k in keys])
    ax.margins(y=0.12)   # room for the labels above the tallest bar
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _save(fig, path)


def bench_chart(runs: list[dict], best: list[dict], speedups: dict[str, float], path: str | Path,
                width: int = 900, height: int = 480) -> None:
    """Grouped bars of tokens/s: one group per batch size, one bar per method (`runs` rows of
    `specllava bench`). Each method's best bar (`best`: {"method", "batch_size", "tokens_per_s"})
    gets a black outline and a "best" label, and the subtitle gives best-vs-best `speedups`."""
    fig, (ax,) = _figure(width, height)
    _bench_axes(ax, runs, best, speedups)
    _save(fig, path)


def _bench_axes(ax, runs: list[dict], best: list[dict], speedups: dict[str, float]) -> None:
    sizes = sorted({r["batch_size"] for r in runs})
    methods = [m for m in BENCH_COLORS if any(r["method"] == m for r in runs)]
    methods += sorted({r["method"] for r in runs} - set(methods))
    marked = {(b["method"], b["batch_size"]) for b in best}
    ax.figure.suptitle("tokens/s by method and batch size (higher is better; outlined: each method's best)",
                       fontsize=11)
    if speedups:
        ax.set_title("best vs best (each method's best / target_greedy's best): "
                     + ", ".join(f"{m} {x:.2f}x" for m, x in speedups.items()), fontsize=8, color="0.25")
    ax.set_xlabel("batch size (rows decoded together)")
    ax.set_ylabel("throughput (new tokens/s)")
    if not runs:
        _no_data(ax)
        return
    group_w = 0.8
    for gi, bs in enumerate(sizes):
        group = [m for m in methods if any(r["method"] == m and r["batch_size"] == bs for r in runs)]
        bar_w = group_w / len(group)
        for bi, m in enumerate(group):
            r = next(r for r in runs if r["method"] == m and r["batch_size"] == bs)
            x = gi - group_w / 2 + (bi + 0.5) * bar_w
            is_best = (m, bs) in marked
            color = _method_color(m, methods)
            (bar,) = ax.bar([x], [r["tokens_per_s"]], width=bar_w * 0.92, color=color,
                            edgecolor="black" if is_best else color, linewidth=2.0 if is_best else 0.5,
                            gid=f"{m}@{bs}")
            text = f"{r['tokens_per_s']:.0f}" + ("\nbest" if is_best else "")
            ax.annotate(text, (x, r["tokens_per_s"]), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, fontweight="bold" if is_best else "normal")
    ax.set_xticks(range(len(sizes)), [str(bs) for bs in sizes])
    ax.set_xlim(-0.6, len(sizes) - 0.4)
    ax.margins(y=0.15)
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(facecolor=_method_color(m, methods), label=m) for m in methods],
              fontsize=8, loc="upper left")


def _method_color(method: str, methods: list[str]) -> str:
    """A method's own colour; a method without one takes a palette colour no named method uses."""
    if method in BENCH_COLORS:
        return BENCH_COLORS[method]
    free = [c for c in PALETTE if c not in BENCH_COLORS.values()] or PALETTE
    unnamed = [m for m in methods if m not in BENCH_COLORS]
    return free[unnamed.index(method) % len(free)]


def demo_pair_chart(root: str | Path) -> Path:
    """Training curves of assets/demo-pair: target loss, held-out accuracy, draft KL."""
    root = Path(root)
    log = json.loads((root / "target" / "train_log.json").read_text())
    panels = [("target: caption cross-entropy (train)", {"loss": [(h["step"], h["loss"]) for h in log["history"]]},
               True, None, "cross-entropy (nats/token, log scale)"),
              ("target: held-out attribute accuracy", {"accuracy": [(e["step"], e["attribute_accuracy"])
                                                                    for e in log["evals"]]}, False, (0.0, 1.0),
               "accuracy (fraction of attributes)")]
    stats_path = root / "draft" / "distill_stats.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        panels.append(("draft: KL(target || draft) (train)", {"kl": [(h["step"], h["kl"]) for h in stats["history"]]},
                       True, None, "KL divergence (nats/token, log scale)"))
    out = root / "training_curves.png"
    line_chart(panels, out)
    return out


if __name__ == "__main__":
    print(demo_pair_chart(sys.argv[1] if len(sys.argv) > 1 else "assets/demo-pair"))
