"""Claim 3 from the SGD entropy probes (``pipeline.core.entropy_probe``): over many probes, does the exact
entropy change of one small SGD step track the law's prediction ``-lr * Cov``?

Pure over ``metrics.jsonl`` rows. For each probed lr, pooled over the given runs' probes:
- ``corr_token`` / ``corr_group`` / ``corr_vanilla``: Pearson r between the measured change and
  ``-Cov`` in the token-level natural-PG form, the paper's per-group form, and the vanilla-PG form
  (``-lr`` scales every point alike, so it does not change r);
- ``slope``: least-squares factor ``k`` in ``measured ~ k * (-lr * Cov_token)`` (through the origin): 1 would
  be the natural-PG law's magnitude for a tabular softmax; a network's logits do not move by ``lr * A``,
  so only its constancy across small lrs (the first-order regime) is the law's claim;
- ``sign_agreement``: share of probes where the measured change has the sign of ``-Cov_token``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.runs import pearson

PREFIX = "probe/dH@lr"
FORMS = {"token": "probe/cov_token", "group": "probe/cov_group", "vanilla": "probe/cov_token_vanilla"}


def probe_lrs(rows: list[dict[str, Any]]) -> list[float]:
    """The probed learning rates found in ``rows``, ascending."""
    return sorted({float(k[len(PREFIX) :]) for r in rows for k in r if k.startswith(PREFIX)})


def probe_points(rows: list[dict[str, Any]], lr: float) -> dict[str, np.ndarray]:
    """Per probe at ``lr``: ``measured`` and each covariance form (rows without the probe are skipped)."""
    key = f"{PREFIX}{lr:g}"
    pts = [r for r in rows if key in r and all(f in r for f in FORMS.values())]
    out = {"measured": np.array([float(r[key]) for r in pts])}
    return out | {form: np.array([float(r[f]) for r in pts]) for form, f in FORMS.items()}


def probe_summary(runs_rows: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One dict per probed lr, pooled over ``runs_rows`` (see the module docstring)."""
    lrs = sorted({lr for rows in runs_rows for lr in probe_lrs(rows)})
    out = []
    for lr in lrs:
        parts = [probe_points(rows, lr) for rows in runs_rows]
        pts = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        meas, pred = pts["measured"], -lr * pts["token"]
        slope = float(meas @ pred / (pred @ pred)) if pred.size and pred @ pred > 0 else None
        out.append(
            {
                "lr": lr,
                "n": int(meas.size),
                "corr_token": pearson(meas, -pts["token"]),
                "corr_group": pearson(meas, -pts["group"]),
                "corr_vanilla": pearson(meas, -pts["vanilla"]),
                "slope": slope,
                "sign_agreement": float(np.mean(np.sign(meas) == np.sign(-pts["token"])))
                if meas.size
                else None,
                "measured_mean": float(meas.mean()) if meas.size else None,
            }
        )
    return out


def render_probe_table(summary: list[dict[str, Any]]) -> str:
    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [
        "| SGD lr | probes | corr(dH, −Cov) token | corr, per-group form | corr, vanilla-PG form | dH / (−lr·Cov) | sign agrees | mean dH |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['lr']:g} | {s['n']} | {f(s['corr_token'], '.2f')} | {f(s['corr_group'], '.2f')} | "
            f"{f(s['corr_vanilla'], '.2f')} | {f(s['slope'], '.2f')} | {f(s['sign_agreement'], '.0%')} | "
            f"{f(s['measured_mean'], '.2e')} |"
        )
    return "\n".join(lines) + "\n"


def plot_probes(arm_rows: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path | None:
    """Measured dH / lr against -Cov_token, one panel per lr, one colour per arm (None without probes)."""
    from matplotlib.figure import Figure

    lrs = sorted({lr for runs in arm_rows.values() for rows in runs for lr in probe_lrs(rows)})
    if not lrs:
        return None
    fig = Figure(figsize=(4.2 * len(lrs), 4.0), dpi=120)
    axes = fig.subplots(1, len(lrs), squeeze=False)[0]
    for ax, lr in zip(axes, lrs, strict=True):
        lim = 0.0
        for i, (arm, runs) in enumerate(arm_rows.items()):
            parts = [probe_points(rows, lr) for rows in runs]
            x = np.concatenate([-p["token"] for p in parts])
            y = np.concatenate([p["measured"] for p in parts]) / lr
            if x.size:
                ax.scatter(x, y, s=8, alpha=0.6, color=f"C{i}", label=arm)
                lim = max(lim, float(np.abs(np.concatenate([x, y])).max()))
        if lim:
            ax.plot([-lim, lim], [-lim, lim], color="0.5", lw=0.8, ls="--", label="dH = −lr·Cov")
        ax.set_title(f"one SGD step, lr = {lr:g}")
        ax.set_xlabel("−Cov(log π, A) (token level)")
        ax.set_ylabel("measured dH / lr")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path
