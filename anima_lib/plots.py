"""Figures the reports show: image grids with labels and metric-versus-steps curves."""
from __future__ import annotations

from typing import Optional, Sequence

import matplotlib.pyplot as plt
import torch

from .flow_training import smoothed


def image_grid(rows: Sequence[torch.Tensor], row_labels: Sequence[str], col_labels: Optional[Sequence[str]] = None,
               title: str = "", cell_inches: float = 1.1):
    """rows: one [N,3,H,W] tensor in [0,1] per row (same N); every column shares its seed across rows."""
    n_rows, n_cols = len(rows), rows[0].shape[0]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols + 1.2, cell_inches * n_rows + 0.4),
                             squeeze=False)
    for r, images in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).cpu().float().numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and col_labels is not None:
                ax.set_title(col_labels[c], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def metric_vs_steps(rows: dict[str, dict[str, float]], metric: str, title: str = "", logx: bool = True):
    """rows as in metrics.json ('teacher@4': {...}); one line per model, x = steps."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    models: dict[str, list[tuple[int, float]]] = {}
    for row, metrics in rows.items():
        if metric in metrics:
            model, steps = row.split("@")
            models.setdefault(model, []).append((int(steps), metrics[metric]))
    for model, points in sorted(models.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("steps")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lines(x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str = "",
          logy: bool = False, reference: Optional[dict[str, float]] = None):
    """One line per entry of `series` over the shared x; `reference` draws labelled horizontal lines."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    colours: dict[str, str] = {}
    for label, values in series.items():
        base = label.replace(" uncond", "")  # a model's unconditional curve shares its colour, dashed
        line, = ax.plot(list(x), list(values), marker="o", markersize=3, label=label, color=colours.get(base),
                        linestyle="--" if label != base else "-")
        colours.setdefault(base, line.get_color())
    for label, value in (reference or {}).items():
        ax.axhline(value, color="grey", linewidth=0.8, linestyle=":")
        ax.annotate(label, (x[0], value), fontsize=7, color="grey", va="bottom")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def training_curves(history: list[dict], panels: dict[str, Sequence[str]], window: int = 20, title: str = ""):
    """One panel per entry of `panels` ({"losses": ["scm", "dmd"], ...}); each key is plotted against the iteration
    where it was logged, raw (faint) and as a running mean over `window` points, on a log y-axis."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (panel, keys) in zip(axes[0], panels.items()):
        for key in keys:
            points = [(h["iteration"], h[key]) for h in history if key in h and h[key] is not None]
            if not points:
                continue
            x, y = [p[0] for p in points], [abs(p[1]) for p in points]
            line, = ax.plot(x, y, alpha=0.25, linewidth=0.8)
            ax.plot(x, smoothed(y, window), color=line.get_color(), label=key)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def stacked_bars(rows: dict[str, dict[str, float]], parts: Sequence[str], budgets: dict[str, float], unit: str = "GB",
                 title: str = ""):
    """One horizontal bar per row, stacked by `parts`; vertical lines at each budget."""
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.2))
    names = list(rows)
    left = [0.0] * len(names)
    for part in parts:
        values = [rows[n][part] for n in names]
        ax.barh(names, values, left=left, label=part)
        left = [a + b for a, b in zip(left, values)]
    for i, (label, value) in enumerate(budgets.items()):  # labels on separate lines so close budgets stay legible
        ax.axvline(value, color="black", linestyle="--", linewidth=1)
        ax.text(value, -0.6 - 0.45 * i, f" {label}", fontsize=8, va="bottom")
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def sorted_values(values: dict[str, float], title: str = "", ylabel: str = "", threshold: Optional[float] = None):
    """A bar per key, sorted ascending (e.g. per-layer sensitivity); an optional horizontal threshold."""
    items = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(items)), 3.2))
    ax.bar(range(len(items)), [v for _, v in items])
    if threshold is not None:
        ax.axhline(threshold, color="red", linestyle="--", linewidth=1)
    step = max(1, len(items) // 12)
    ax.set_xticks(range(0, len(items), step), [k for k, _ in items][::step], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_matrices(matrices: dict[str, dict], title: str = ""):
    """One heat map per row of {"prompted": [...], "read": [...], "counts": [[...]]} (rows: prompted, columns: read),
    each cell labelled with its share of the prompted class; the diagonal is what the reader got right."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(2.6 * len(matrices) + 0.4, 2.8), squeeze=False)
    for ax, (row, matrix) in zip(axes[0], matrices.items()):
        counts = torch.tensor(matrix["counts"], dtype=torch.float32)
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
        for i in range(share.shape[0]):
            for j in range(share.shape[1]):
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(matrix["read"])), [str(v) for v in matrix["read"]], fontsize=7)
        ax.set_yticks(range(len(matrix["prompted"])), [str(v) for v in matrix["prompted"]], fontsize=7)
        ax.set_xlabel("read", fontsize=8)
        ax.set_title(row, fontsize=8)
    axes[0][0].set_ylabel("prompted", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def reliability(curves: dict[str, dict], title: str = ""):
    """Calibration: accuracy against mean confidence per confidence bin, one line per row (the diagonal is perfect);
    the legend carries each row's expected calibration error."""
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for row, curve in curves.items():
        points = [(c, a) for c, a in zip(curve["confidence"], curve["accuracy"]) if c is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=f"{row} (ECE {curve['ece']:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "calibration", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
