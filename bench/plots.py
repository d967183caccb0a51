"""The benchmark's figures (matplotlib, Agg backend: no display needed).

* ``<workload>_<scale>_tradeoff.png``: accuracy (± SE) against saved-for-backward
  MiB per sample (left) and against the step's peak MiB (right), one point per method;
  workloads without accuracy plot the step-time ratio instead.
* ``<workload>_<scale>_breakdown.png``: per op class, the MiB per sample a razorpass
  method saves for backward next to what those tensors take dense
  (``MemoryReport.by_op_class()``).
"""

from __future__ import annotations

import pathlib
import textwrap
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .runner import MethodResult  # noqa: E402

__all__ = ["plot_tradeoff", "plot_breakdown"]

MiB = 2**20


def plot_tradeoff(results: Sequence[MethodResult], title: str, path: pathlib.Path) -> pathlib.Path | None:
    ok = [r for r in results if r.ok and r.saved_bytes is not None]
    if not ok:
        return None
    has_accuracy = all(r.accuracy is not None for r in ok)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    xs = (
        ("saved for backward (MiB / sample, log)", lambda r: r.per_sample(r.saved_bytes) / MiB),
        ("peak memory of a training step (MiB, log)", lambda r: r.peak_bytes / MiB),
    )
    for ax, (label, x_of) in zip(axes, xs):
        for r in ok:
            x = x_of(r)
            if has_accuracy:
                y, err = r.accuracy, r.accuracy_se
            elif r.paired_ratio is not None:  # drift-free: timed step for step against the baseline
                y, err = r.paired_ratio
            else:
                y, err = r.step_ratio or 1.0, None
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3)
            ax.annotate(r.method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy (± binomial SE)" if has_accuracy else "step time (x baseline, ± paired SE)")
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_breakdown(results: Sequence[MethodResult], title: str, path: pathlib.Path) -> pathlib.Path | None:
    with_breakdown = [r for r in results if r.ok and r.breakdown]
    if not with_breakdown:
        return None
    classes = sorted({c for r in with_breakdown for c in r.breakdown})
    height = 0.8 / len(with_breakdown)
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(classes) * len(with_breakdown)))
    for i, r in enumerate(with_breakdown):
        color = f"C{i}"
        ys = [j + i * height for j in range(len(classes))]
        dense = [r.breakdown.get(c, (0, 0))[0] / MiB for c in classes]
        saved = [r.breakdown.get(c, (0, 0))[1] / MiB for c in classes]
        # Outline: what the same tensors take dense; filled: what the method saves.
        ax.barh(ys, dense, height=height, fill=False, edgecolor=color, linestyle="--")
        ax.barh(ys, saved, height=height, color=color, label=f"{r.method} (outline: dense)")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(classes))], classes)
    ax.invert_yaxis()
    ax.set_xlabel("saved for backward (MiB / sample)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
