"""PNG plots for evaluation reports (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_roc", "plot_cmc", "plot_score_histogram"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _thin(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    # IJB-C has ~15M pairs: plotting every ROC vertex would make a huge, slow figure. Keep points evenly
    # spaced in log-FPR, which is the axis people read.
    if fpr.size <= max_points:
        return fpr, tpr
    keys = np.log10(np.maximum(fpr, 1e-9))
    grid = np.linspace(keys.min(), keys.max(), max_points)
    idx = np.unique(np.r_[np.searchsorted(keys, grid).clip(0, fpr.size - 1), fpr.size - 1])
    return fpr[idx], tpr[idx]


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike[str],
             title: str = "ROC", log_x: bool = True, min_fpr: float = 1e-6) -> Path:
    """One ROC (TAR vs FAR) per named curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = _thin(np.asarray(fpr), np.asarray(tpr))
        if log_x:
            keep = fpr > 0
            ax.plot(fpr[keep], tpr[keep], label=label)
        else:
            ax.plot(fpr, tpr, label=label)
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(min_fpr, 1.0)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_cmc(curves: dict[str, Sequence[float]], path: str | os.PathLike[str], title: str = "CMC") -> Path:
    """Identification rate vs rank, one line per named curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, cmc in curves.items():
        ax.plot(np.arange(1, len(cmc) + 1), cmc, marker="o", markersize=3, label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_score_histogram(genuine: np.ndarray, impostor: np.ndarray, path: str | os.PathLike[str],
                         title: str, xlabel: str = "cosine similarity",
                         threshold: float | None = None) -> Path:
    """Genuine vs impostor score distributions (density, so unequal counts compare)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = np.r_[genuine, impostor]
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-9, 80) if values.size else 10
    ax.hist(impostor, bins=bins, density=True, alpha=0.55, label=f"impostor ({len(impostor)})")
    ax.hist(genuine, bins=bins, density=True, alpha=0.55, label=f"genuine ({len(genuine)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out
