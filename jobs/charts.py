"""Minimal line charts drawn with Pillow (no plotting dependency).

    python -m jobs.charts assets/demo-pair   # -> assets/demo-pair/training_curves.png

`line_chart(panels, path)` draws one panel per (title, {series name: [(x, y), ...]}) side by side,
with y on a log scale when `log_y` is set; used for the demo pair's training curves.
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
