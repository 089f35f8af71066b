"""Metrics out: one JSON object per step in `metrics.jsonl`, TensorBoard scalars, and PNG plots."""

from __future__ import annotations

import json
import math
import os

import numpy as np

# What the end-of-run figure shows, in this order: (metric key, panel title).
PLOT_PANELS = (
    ("reward/mean", "reward"),
    ("accuracy", "accuracy (strict)"),
    ("format_rate", "format rate"),
    ("completion_length/mean", "completion length (tokens)"),
    ("kl", "KL to reference"),
    ("loss", "loss"),
)


def _jsonable(value):
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; readers see null
    return value


class MetricsWriter:
    """Appends metrics to `OUTPUT_DIR/metrics.jsonl` and TensorBoard (only on the main process).

    Appending (never rewriting) means a resumed run carries the file on; a step logged twice across a
    crash appears twice with the same values, which readers resolve by keeping the last.
    """

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, one per step (the last record wins for a step logged twice)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics_path: str, out_png: str, panels=PLOT_PANELS) -> str:
    """A grid of the training curves (reward, accuracy, format, length, KL, loss) as one PNG."""
    plt = pyplot()

    records = read_metrics(metrics_path)
    panels = [(key, title) for key, title in panels if any(r.get(key) is not None for r in records)]
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        steps, values = zip(*points)
        ax.plot(steps, values, lw=1, alpha=0.4, color="C0")
        ax.plot(steps, _smooth(values), lw=2, color="C0")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _smooth(values, window: int = 10):
    """Trailing moving average, the same length as `values`."""
    values = np.asarray(values, np.float64)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    starts = np.arange(1, len(values) + 1) - counts
    return (cumulative[np.arange(1, len(values) + 1)] - cumulative[starts]) / counts


def plot_comparison(results: dict[str, dict], keys, out_png: str, title: str = "") -> str:
    """Grouped bars: one group per metric in `keys`, one bar per model in `results` ({name: metrics})."""
    plt = pyplot()

    names = list(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(keys), 3.4))
    for i, name in enumerate(names):
        values = [results[name].get(key, float("nan")) for key in keys]
        bars = ax.bar(np.arange(len(keys)) + (i - (len(names) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(keys)), keys)
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
