"""Minimal charts drawn with Pillow (no plotting dependency).

    python -m jobs.charts assets/demo-pair   # -> assets/demo-pair/training_curves.png

`line_chart(panels, path)` draws one panel per (title, {series name: [(x, y), ...]}) side by side,
with y on a log scale when `log_y` is set; used for the demo pair's training curves.
`bar_chart(counts, path)` draws one bar per key (`specllava stats`).
`bench_chart(runs, best, speedups, path)` draws `specllava bench`'s tokens/s grouped by batch size,
each method's best bar outlined and labelled.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1)]
    step = (hi - lo) / 4 or 1.0
    return [lo + i * step for i in range(5)]


def line_chart(panels: list[tuple], path: str | Path, width: int = 460, height: int = 320) -> None:
    """panels: (title, {name: [(x, y), ...]}, log_y[, (y_min, y_max)]). Writes a PNG to `path`."""
    image = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, 15, 30, 40
    for p, (title, series, log_y, *ylim) in enumerate(panels):
        ox = p * width
        pts = [(x, y) for s in series.values() for x, y in s if not log_y or y > 0]
        if not pts:
            continue
        tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
        x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts) or 1
        y0, y1 = min(tf(y) for _, y in pts), max(tf(y) for _, y in pts)
        if log_y:
            y0, y1 = math.floor(y0), math.ceil(y1)
        elif ylim:
            y0, y1 = min(y0, ylim[0][0]), max(y1, ylim[0][1])
        y1 = y1 if y1 > y0 else y0 + 1
        sx = lambda x: ox + left + (x - x0) / max(x1 - x0, 1e-9) * (width - left - right)  # noqa: E731
        sy = lambda y: top + (1 - (tf(y) - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
        draw.rectangle([ox + left, top, ox + width - right, height - bottom], outline="black")
        draw.text((ox + left, 8), title, fill="black")
        for t in _ticks(y0, y1, log_y):
            yy = sy(t) if log_y else top + (1 - (t - y0) / (y1 - y0)) * (height - top - bottom)
            draw.line([ox + left - 4, yy, ox + left, yy], fill="black")
            draw.text((ox + 4, yy - 6), f"{t:.3g}", fill="black")
        for i in range(5):
            x = x0 + i * (x1 - x0) / 4
            draw.text((sx(x) - 10, height - bottom + 6), f"{x:.0f}", fill="black")
        draw.text((ox + width // 2 - 10, height - 16), "step", fill="black")
        for k, (name, s) in enumerate(series.items()):
            color = PALETTE[k % len(PALETTE)]
            xy = [(sx(x), sy(y)) for x, y in s if not log_y or y > 0]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy if len(xy) < 20 else []:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.text((ox + width - right - 150, top + 6 + 14 * k), name, fill=color)
    image.save(path)


def bar_chart(counts: dict, path: str | Path, title: str = "", x_label: str = "", y_label: str = "",
              width: int = 520, height: int = 320) -> None:
    """One bar per key of `counts` (sorted), heights labelled; writes a PNG to `path`."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, 15, 44, 40
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    keys = sorted(counts)
    peak = max(counts.values(), default=0) or 1
    slot = (width - left - right) / max(len(keys), 1)
    for i, key in enumerate(keys):
        x0 = left + i * slot + slot * 0.15
        x1 = left + (i + 1) * slot - slot * 0.15
        y = top + (1 - counts[key] / peak) * (height - top - bottom)
        draw.rectangle([x0, y, x1, height - bottom], fill=PALETTE[0])
        draw.text(((x0 + x1) / 2 - 6, height - bottom + 6), str(key), fill="black")
        draw.text((x0, y - 13), str(counts[key]), fill="black")
    draw.text((width // 2 - 40, height - 16), x_label, fill="black")
    draw.text((4, 24), y_label, fill="black")
    image.save(path)


BENCH_COLORS = {"target_greedy": (127, 127, 127), "hf_assisted": (214, 39, 40), "static_tree": (31, 119, 180),
                "dynamic_tree": (44, 160, 44)}


def bench_chart(runs: list[dict], best: list[dict], speedups: dict[str, float], path: str | Path,
                width: int = 720, height: int = 380) -> None:
    """Grouped bars of tokens/s: one group per batch size, one bar per method (`runs` rows of
    `specllava bench`). Each method's best bar (`best`: {"method", "batch_size", "tokens_per_s"})
    gets a black outline and a "best" label, and the subtitle gives best-vs-best `speedups`."""
    sizes = sorted({r["batch_size"] for r in runs})
    top = max((r["tokens_per_s"] for r in runs), default=0) or 1
    marked = {(b["method"], b["batch_size"]) for b in best}
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, bottom, plot_h = 60, height - 50, height - 116
    group_w = (width - left - 20) / max(1, len(sizes))
    draw.text((left, 8), "tokens/s by method and batch size (higher is better; outlined: each method's best)",
              fill="black")
    if speedups:
        draw.text((left, 24), "best vs best (each method's best over target_greedy's best): "
                  + ", ".join(f"{m} {x:.2f}x" for m, x in speedups.items()), fill="black")
    draw.line([(left, bottom), (width - 10, bottom)], fill="black")
    for gi, bs in enumerate(sizes):
        group = [r for r in runs if r["batch_size"] == bs]
        bar_w = group_w * 0.8 / max(1, len(group))
        for bi, r in enumerate(group):
            x0 = left + gi * group_w + group_w * 0.1 + bi * bar_w
            h = plot_h * r["tokens_per_s"] / top
            color = BENCH_COLORS.get(r["method"], PALETTE[bi % len(PALETTE)])
            is_best = (r["method"], bs) in marked
            draw.rectangle([x0, bottom - h, x0 + bar_w - 3, bottom], fill=color,
                           outline="black" if is_best else None, width=2 if is_best else 1)
            draw.text((x0, bottom - h - 12), f"{r['tokens_per_s']:.0f}", fill="black")
            if is_best:
                draw.text((x0, bottom - h - 24), "best", fill="black")
        draw.text((left + gi * group_w + group_w * 0.4, bottom + 8), f"batch {bs}", fill="black")
    for i, (m, c) in enumerate(BENCH_COLORS.items()):
        draw.rectangle([left + i * 150, height - 20, left + i * 150 + 10, height - 10], fill=c)
        draw.text((left + i * 150 + 14, height - 22), m, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def demo_pair_chart(root: str | Path) -> Path:
    """Training curves of assets/demo-pair: target loss, held-out accuracy, draft KL."""
    root = Path(root)
    log = json.loads((root / "target" / "train_log.json").read_text())
    panels = [("target: caption cross-entropy (train)", {"loss": [(h["step"], h["loss"]) for h in log["history"]]}, True),
              ("target: held-out attribute accuracy", {"accuracy": [(e["step"], e["attribute_accuracy"])
                                                                    for e in log["evals"]]}, False, (0.0, 1.0))]
    stats_path = root / "draft" / "distill_stats.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        panels.append(("draft: KL(target || draft) (train)", {"kl": [(h["step"], h["kl"]) for h in stats["history"]]},
                       True))
    out = root / "training_curves.png"
    line_chart(panels, out)
    return out


if __name__ == "__main__":
    print(demo_pair_chart(sys.argv[1] if len(sys.argv) > 1 else "assets/demo-pair"))
