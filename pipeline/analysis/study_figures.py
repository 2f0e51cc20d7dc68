"""The reproduction study's figures: per-arm mean over seeds with a min-max band, and the pooled law.

Split from ``pipeline.analysis.study`` (numbers and tables) so each stays small; pure over ``metrics.jsonl`` rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.runs import paired, pass_at_k_keys, series
from pipeline.core.law import fit_law


def _band(runs_rows: list[list[dict[str, Any]]], key: str):
    """Steps logged by every run, with the mean, min and max across runs."""
    per = [dict(zip(*series(rows, key), strict=True)) for rows in runs_rows]
    common = sorted(set.intersection(*(set(p) for p in per))) if per else []
    if not common:
        return None
    vals = np.array([[p[s] for s in common] for p in per])
    return np.array(common), vals.mean(0), vals.min(0), vals.max(0)


def plot_study(arm_rows: dict[str, list[list[dict[str, Any]]]], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    panels = (
        ("study_entropy.png", "entropy/mean", "Policy entropy (mean over seeds, min–max band)", "nats"),
        ("study_accuracy.png", "eval/pass@1", "Held-out pass@1 (mean over seeds, min–max band)", "pass@1"),
    )
    for fname, key, title, ylabel in panels:
        fig = Figure(figsize=(7.5, 4.8), dpi=120)
        ax = fig.add_subplot()
        for i, (arm, runs) in enumerate(arm_rows.items()):
            band = _band(runs, key)
            if band is None:
                continue
            s, m, lo, hi = band
            ax.plot(s, m, color=f"C{i}", lw=1.8, label=arm)
            ax.fill_between(s, lo, hi, color=f"C{i}", alpha=0.15)
            if key == "entropy/mean":
                tgt = _band(runs, "control/target")
                if tgt is not None:
                    ax.plot(tgt[0], tgt[1], color=f"C{i}", ls="--", lw=1, label=f"{arm} target")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / fname)
        paths.append(out / fname)

    pass_k = plot_pass_at_k(arm_rows, out / "study_pass_at_k.png")
    if pass_k is not None:
        paths.append(pass_k)

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.add_subplot()
    for i, (arm, runs) in enumerate(arm_rows.items()):
        pts = [paired(rows, "entropy/mean", "eval/pass@1") for rows in runs]
        h = np.concatenate([p[0] for p in pts])
        r = np.concatenate([p[1] for p in pts])
        if h.size < 3:
            continue
        ax.scatter(h, r, s=10, color=f"C{i}", alpha=0.6)
        try:
            fit = fit_law(h, r)
        except ValueError:
            continue
        grid = np.linspace(0, h.max() * 1.05, 100)
        ax.plot(
            grid,
            fit.predict(grid),
            color=f"C{i}",
            lw=1.5,
            label=f"{arm}: a={fit.a:.2f} b={fit.b:.2f} R²={fit.r2:.2f}",
        )
    ax.set_title("Entropy–performance law, all seeds pooled per arm")
    ax.set_xlabel("mean token entropy H")
    ax.set_ylabel("eval pass@1 R")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "study_law.png")
    paths.append(out / "study_law.png")
    return paths


def plot_pass_at_k(arm_rows: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path | None:
    """One panel per logged k: held-out pass@k per arm, mean over seeds with a min-max band."""
    from matplotlib.figure import Figure

    keys = sorted(
        {k for runs in arm_rows.values() for rows in runs for k in pass_at_k_keys(rows)},
        key=lambda k: int(k.rsplit("@", 1)[1]),
    )
    if not keys:
        return None
    fig = Figure(figsize=(4.0 * len(keys), 3.8), dpi=120)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        for i, (arm, runs) in enumerate(arm_rows.items()):
            band = _band(runs, key)
            if band is None:
                continue
            s, m, lo, hi = band
            ax.plot(s, m, color=f"C{i}", lw=1.6, label=arm)
            ax.fill_between(s, lo, hi, color=f"C{i}", alpha=0.12)
        ax.set_title(f"held-out {key.removeprefix('eval/')}")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("pass@k (mean over seeds, min–max band)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path
