"""The report's PNG plots, drawn with matplotlib's object API on the Agg canvas (no pyplot,
no global backend switch), written atomically. Each returns False when it has nothing to draw."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ssb.config import lookup
from ssb.funnel import REJECT_REASONS
from ssb.report.data import (
    LOSS_KEYS,
)
from ssb.rundir import atomic_write_bytes


def save_png(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 -- start-up: matplotlib loads only when a plot is drawn
    from matplotlib.figure import Figure  # noqa: PLC0415 -- start-up (see above)

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def panel_grid(count: int, max_cols: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure of `count` panels, at most `max_cols` a row, each `width` x `height` inches; the
    grid's unused cells are hidden. Returns (figure, the `count` axes)."""
    ncols = min(max_cols, count)
    nrows = math.ceil(count / ncols)
    fig = figure(width * ncols, height * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, list(axes[:count])


def plot_training(series: dict[str, tuple[list[float], list[float]]], path: Path) -> bool:
    panels = []
    losses = [k for k in LOSS_KEYS if k in series]
    if losses:
        panels.append(("loss", losses))
    for name, title in (("grad_norm", "gradient norm"), ("reply_length", "mean reply length")):
        if name in series:
            panels.append((title, [name]))
    if "learning_rate" in series:
        panels.append(("learning rate", ["learning_rate"]))
    if not panels:
        return False
    fig, axes = panel_grid(len(panels), 2, 4.6, 3.2)
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            xs, ys = series[name]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize=8)
    save_png(fig, path)
    return True


def plot_accuracy(summary: dict[str, Any], path: Path) -> bool:
    results = summary.get("results") or {}
    models = [m for m in results if any(r.get("accuracy") is not None for r in results[m].values())]
    benches = []
    for m in models:
        benches += [b for b in results[m] if b not in benches]
    if not models or not benches:
        return False
    fig = figure(max(4.5, 1.6 + 1.3 * len(benches) * max(1, len(models)) / 2), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        xs, ys, lo, hi, ref_x, ref_y = [], [], [], [], [], []
        for i, b in enumerate(benches):
            r = results[m].get(b)
            if not r or r.get("accuracy") is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            acc = 100 * r["accuracy"]
            interval = r.get("interval") or [r["accuracy"], r["accuracy"]]
            xs.append(x)
            ys.append(acc)
            lo.append(max(0.0, acc - 100 * interval[0]))
            hi.append(max(0.0, 100 * interval[1] - acc))
            if r.get("accuracy_reference") is not None:
                ref_x.append(x)
                ref_y.append(100 * r["accuracy_reference"])
        ax.bar(xs, ys, width * 0.92, yerr=[lo, hi], capsize=3, label=m)
        if ref_x:
            ax.scatter(
                ref_x,
                ref_y,
                marker="x",
                color="black",
                zorder=3,
                label="reference harness" if j == 0 else None,
            )
    ax.set_xticks(range(len(benches)), benches)
    metric = lookup(summary, "settings.metric") or "accuracy"
    scoring = lookup(summary, "settings.scoring") or ""
    ax.set_ylabel(f"{metric} (%), 95% interval")
    ax.set_title(f"accuracy by benchmark ({scoring})" if scoring else "accuracy by benchmark")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
    return True


def plot_funnel(funnel: dict[str, Any], path: Path) -> bool:
    stages = [
        ("problems", funnel.get("problems")),
        ("mixed", funnel.get("mixed")),
        ("kept", funnel.get("kept")),
    ]
    stages = [(k, v) for k, v in stages if v is not None]
    if not stages:
        return False
    reasons = [(REJECT_REASONS[k], funnel["rejected"].get(k, 0)) for k in REJECT_REASONS]
    fig = figure(9.5, 3.2)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.4])
    labels = [k for k, _ in stages][::-1]
    values = [v for _, v in stages][::-1]
    ax1.barh(labels, values, color=["#2a9d8f", "#e9c46a", "#264653"][-len(values) :])
    for y, v in enumerate(values):
        ax1.text(v, y, f" {v}", va="center")
    ax1.set_title("pipeline funnel")
    ax1.set_xlabel("problems")
    ax1.set_xlim(0, max(values + [1]) * 1.2)
    ax2.barh([r for r, _ in reasons][::-1], [c for _, c in reasons][::-1], color="#e76f51")
    for y, (_, c) in enumerate(reasons[::-1]):
        ax2.text(c, y, f" {c}", va="center")
    ax2.set_title("why problems were dropped")
    ax2.set_xlim(0, max([c for _, c in reasons] + [1]) * 1.2)
    save_png(fig, path)
    return True
