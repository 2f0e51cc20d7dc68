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

``decomposition_summary`` walks the chain from the measured change to the law one link at a time, over
probes that carry the first-order terms ``probe/dH_linear`` and ``probe/dH_tabular``: measured -> the
network's first-order term (curvature at that lr) -> the lookup-table term (parameter sharing) -> the
batch covariances (sampled states and actions instead of the per-state expectation). The link whose
correlation drops is where the law stops describing the step.
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


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def render_probe_table(summary: list[dict[str, Any]]) -> str:
    header = ["SGD lr", "probes", "corr(dH, −Cov) token", "corr, per-group form", "corr, vanilla-PG form"]
    header += ["dH / (−lr·Cov)", "sign agrees", "mean dH"]
    rows = [
        [f"{s['lr']:g}", str(s["n"]), _fmt(s["corr_token"], ".2f"), _fmt(s["corr_group"], ".2f")]
        + [_fmt(s["corr_vanilla"], ".2f"), _fmt(s["slope"], ".2f"), _fmt(s["sign_agreement"], ".0%")]
        + [_fmt(s["measured_mean"], ".2e")]
        for s in summary
    ]
    return _table(header, rows)


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


LINEAR, TABULAR = "probe/dH_linear", "probe/dH_tabular"


def _column(rows: list[dict[str, Any]], key: str, need: tuple[str, ...]) -> np.ndarray:
    return np.array([float(r[key]) for r in rows if all(k in r for k in need)])


def _link(name: str, cause: str, y: np.ndarray, x: np.ndarray) -> dict[str, Any]:
    """Pearson r of ``y`` on ``x``, the least-squares factor through the origin, and sign agreement."""
    return {
        "link": name,
        "cause": cause,
        "n": int(y.size),
        "corr": pearson(y, x),
        "slope": float(y @ x / (x @ x)) if x.size and x @ x > 0 else None,
        "sign_agreement": float(np.mean(np.sign(y) == np.sign(x))) if y.size else None,
    }


def decomposition_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chain measured -> dH_linear -> dH_tabular -> -Cov over the probes in ``rows`` that carry the
    first-order terms (all quantities per unit lr; empty when no probe has them)."""
    need = (LINEAR, TABULAR, *FORMS.values())
    lin, tab = _column(rows, LINEAR, need), _column(rows, TABULAR, need)
    if not lin.size:
        return []
    cov = {form: -_column(rows, key, need) for form, key in FORMS.items()}
    links = []
    for lr in probe_lrs(rows):
        key = f"{PREFIX}{lr:g}"
        meas = _column(rows, key, (*need, key)) / lr
        lin_lr = _column(rows, LINEAR, (*need, key))
        links.append(_link(f"measured dH/lr at lr {lr:g} vs network first order", "curvature", meas, lin_lr))
    links.append(_link("network first order vs lookup-table first order", "parameter sharing", lin, tab))
    links.append(
        _link("lookup-table first order vs −Cov(log π, π·A) batch", "batch estimate", tab, cov["vanilla"])
    )
    links.append(
        _link("lookup-table first order vs −Cov(log π, A) batch", "batch estimate", tab, cov["token"])
    )
    links.append(_link("lookup-table first order vs −Cov per group", "batch estimate", tab, cov["group"]))
    links.append(_link("network first order vs −Cov(log π, A) batch", "end to end", lin, cov["token"]))
    return links


def render_decomposition_table(links: list[dict[str, Any]]) -> str:
    header = ["link", "what separates the two", "probes", "corr", "factor (through 0)", "sign agrees"]
    rows = [
        [x["link"], x["cause"], str(x["n"]), _fmt(x["corr"], ".2f"), _fmt(x["slope"], ".3g")]
        + [_fmt(x["sign_agreement"], ".0%")]
        for x in links
    ]
    return _table(header, rows)
