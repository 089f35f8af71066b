"""Metrics out: one JSON object per step in `metrics.jsonl`, TensorBoard scalars, and PNG plots."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from grpo_jax.models.hf import read_json

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
                # Imported here: it imports torch where torch is installed (1.0 s), for TensorBoard runs only.
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


# The evaluation's headline metrics, in the order the run's lines and table show them.
HEADLINE_EVAL_METRICS = ("pass@1", "format_rate", "accuracy_any_format", "greedy_accuracy")


def log_evaluation(label: str, metrics: dict | None) -> None:
    """One line of an evaluation's headline metrics, labelled ("before training"), on the main process."""
    if metrics is None or jax.process_index() != 0:
        return
    shown = [f"{k} {metrics[k]:.3f}" for k in HEADLINE_EVAL_METRICS if metrics.get(k) is not None]
    print(f"eval {label}: {', '.join(shown)}", flush=True)


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
    """matplotlib.pyplot on the Agg backend (files only, no display), imported on first use: pyplot costs 0.3 s,
    and choosing its backend at import would override the backend of any program that imports grpo_jax."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics_path: str, out_png: str, panels=PLOT_PANELS) -> str:
    """A grid of the training curves (reward, accuracy, format, length, KL, loss) as one PNG. When the run's
    directory holds its config.json and summary.json (a finished GRPO run), the figure gets a title, the
    evaluations before and after training are marked on the accuracy panel, and a note says why they differ
    from the training accuracy."""
    plt = pyplot()

    run_dir = os.path.dirname(metrics_path)
    config, summary = (read_json(path) if os.path.exists(path) else None
                       for path in (os.path.join(run_dir, "config.json"), os.path.join(run_dir, "summary.json")))
    records = read_metrics(metrics_path)
    panels = [(key, title) for key, title in panels if any(r.get(key) is not None for r in records)]
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.6), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        steps, values = zip(*points)
        ax.plot(steps, values, lw=1, alpha=0.4, color="C0")
        ax.plot(steps, _smooth(values), lw=2, color="C0", label="training rollouts")
        if key == "accuracy":
            _mark_evaluations(ax, summary, last_step=steps[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if config and "grpo" in config:
        model = os.path.basename(os.path.normpath(str(config["model"])))
        fig.suptitle(f"GRPO on {config['task']}: {model}, seed {config['seed']}")
        if summary and summary.get("eval_after"):
            # Training accuracy and eval pass@1 sample differently: the same policy scores lower at T 1.0.
            train_t, evaluation = config["grpo"]["temperature"], config["eval"]
            fig.text(0.5, 0.01, f"Training accuracy is the rollouts' (sampled at temperature {train_t}); eval pass@1 "
                     f"samples at temperature {evaluation['temperature']}, top-p {evaluation['top_p']}, on held-out "
                     "problems, so it differs from the training curve.", ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _mark_evaluations(ax, summary: dict | None, last_step: int) -> None:
    """The evaluation before training (at step 0) and after it (at the last step) as labelled markers."""
    for label, key, step in (("before", "eval_before", 0), ("after", "eval_after", last_step)):
        value = ((summary or {}).get(key) or {}).get("pass@1")
        if value is not None:
            ax.plot([step], [value], marker="D", color="C3", ls="none")
            ax.annotate(f"eval {label}: {value:.2f}", (step, value), textcoords="offset points", xytext=(4, 6),
                        fontsize=7, color="C3")


def completion_length_change(metrics_path: str) -> tuple[float, float] | None:
    """The rollouts' mean completion length at the first logged step and at the last, in tokens."""
    if not os.path.exists(metrics_path):
        return None
    lengths = [r["completion_length/mean"] for r in read_metrics(metrics_path) if r.get("completion_length/mean")]
    return (lengths[0], lengths[-1]) if lengths else None


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
