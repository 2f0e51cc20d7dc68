"""The figures of ``covrl report`` (one PNG each, runs overlaid); pure over loaded runs' rows. A run without
data for a figure is left out of it; a figure with no data at all is still written, with a note."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.analysis.runs import as_float, paired, pass_at_k_keys, series

FIGURES = (
    "entropy.png",
    "accuracy.png",
    "pass_at_k.png",
    "law.png",
    "entropy_change.png",
    "covariance.png",
)
PASS_AT_K_STYLES = ("-", "--", "-.", ":")
DPI = 120


def _new_figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched

    fig = Figure(figsize=(7.5, 4.8), dpi=DPI)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _finish(fig, ax, path: Path, drew: bool, legend_kw: dict | None = None) -> None:
    if drew:
        ax.legend(fontsize="small", **(legend_kw or {}))
    else:
        ax.text(
            0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", fontsize=16, color="0.5"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")


def _color(i: int) -> str:
    return f"C{i % 10}"


def plot_entropy(runs, labels, path: Path) -> None:
    fig, ax = _new_figure("Policy entropy", "step", "mean token entropy (nats)")
    drew = False
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        s, h = series(run["rows"], "entropy/mean")
        if not s.size:
            continue
        ax.plot(s, h, color=_color(i), lw=1.8, label=label)
        band = [
            (r["step"], as_float(r.get("entropy/p10")), as_float(r.get("entropy/p90")))
            for r in run["rows"]
            if as_float(r.get("step")) is not None
        ]
        band = np.asarray([b for b in band if b[1] is not None and b[2] is not None], dtype=np.float64)
        if len(band) >= 2:
            s_band, lo, hi = band.T
            ax.fill_between(s_band, lo, hi, color=_color(i), alpha=0.15, lw=0, label=f"{label} p10–p90")
        drew = True
    _finish(fig, ax, path, drew)


def plot_accuracy(runs, labels, path: Path) -> None:
    fig, ax = _new_figure("Held-out accuracy and batch reward", "step", "pass@1 / reward")
    drew = False
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        rows = run["rows"]
        s, acc = series(rows, "eval/pass@1")
        if s.size:
            ax.plot(s, acc, color=_color(i), lw=1.8, marker="o", ms=3.5, label=f"{label} eval pass@1")
            drew = True
        s, fin = series(rows, "final/pass@1")
        if s.size:
            ax.plot(s, fin, color=_color(i), marker="*", ms=12, ls="none", label=f"{label} final pass@1")
            drew = True
        s, rew = series(rows, "reward/mean")
        if s.size:
            ax.plot(s, rew, color=_color(i), lw=1.0, alpha=0.35, label=f"{label} reward/mean")
            drew = True
    _finish(fig, ax, path, drew)


def plot_pass_at_k(runs, labels, path: Path) -> None:
    fig, ax = _new_figure("Held-out pass@k (unbiased, from n samples per problem)", "step", "pass@k")
    drew = False
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        for j, key in enumerate(pass_at_k_keys(run["rows"])):
            s, v = series(run["rows"], key)
            if s.size:
                k = key.rsplit("@", 1)[1]
                style = PASS_AT_K_STYLES[j % len(PASS_AT_K_STYLES)]
                ax.plot(
                    s, v, color=_color(i), ls=style, lw=1.6, marker="o", ms=2.5, label=f"{label} pass@{k}"
                )
                drew = True
    _finish(fig, ax, path, drew)


def plot_law(runs, labels, summaries, path: Path) -> None:
    fig, ax = _new_figure(
        "Entropy–performance law  R = −a·exp(H) + b", "mean token entropy H", "eval pass@1 R"
    )
    drew = False
    for i, (run, label, summ) in enumerate(zip(runs, labels, summaries, strict=True)):
        h, r = paired(run["rows"], "entropy/mean", "eval/pass@1")
        if not h.size:
            continue
        ax.scatter(h, r, color=_color(i), s=18, alpha=0.8, label=f"{label} (n={h.size})")
        drew = True
        law = summ["law"]
        if law["a"] is None:
            continue
        hi = max(float(h.max()), 1e-3)
        grid = np.linspace(0.0, hi * 1.05, 200)
        curve = -law["a"] * np.exp(grid) + law["b"]
        ax.plot(
            grid,
            curve,
            color=_color(i),
            lw=1.5,
            label=f"{label} fit a={law['a']:.3f} b={law['b']:.3f} R²={law['r2']:.3f}",
        )
        ax.axhline(
            law["ceiling"],
            color=_color(i),
            ls="--",
            lw=1.0,
            label=f"{label} ceiling −a+b={law['ceiling']:.3f}",
        )
    _finish(fig, ax, path, drew)


def plot_entropy_change(runs, labels, summaries, path: Path) -> None:
    fig, ax = _new_figure(
        "Entropy change: covariance prediction vs measurement",
        "predicted change  −Cov(log π, A)",
        "measured change  H_after − H_before",
    )
    drew = False
    for i, (run, label, summ) in enumerate(zip(runs, labels, summaries, strict=True)):
        x, y = paired(run["rows"], "entropy/predicted_change", "entropy/measured_change")
        if not x.size:
            continue
        r = summ["entropy_change_corr"]
        ax.scatter(
            x,
            y,
            color=_color(i),
            s=18,
            alpha=0.8,
            label=f"{label}  r = {r:.3f} (n={x.size})" if r is not None else f"{label}  r = n/a (n={x.size})",
        )
        drew = True
    if drew:
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axvline(0, color="0.6", lw=0.8)
    _finish(fig, ax, path, drew)


def plot_covariance(runs, labels, path: Path) -> None:
    fig, ax = _new_figure("Per-token covariance Cov(log π, A)", "step", "covariance (symlog)")
    styles = (("cov/p50", "-", "p50"), ("cov/p99", "--", "p99"), ("cov/max", ":", "max"))
    drew = False
    all_vals = []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        for key, ls, name in styles:
            s, v = series(run["rows"], key)
            if not s.size:
                continue
            ax.plot(s, v, color=_color(i), ls=ls, lw=1.4, label=f"{label} {name}")
            all_vals.append(np.abs(v))
            drew = True
    if drew:
        nz = np.concatenate(all_vals)
        nz = nz[nz > 0]
        linthresh = (
            float(np.quantile(nz, 0.05)) if nz.size else 1e-6
        )  # linear only around the smallest values
        ax.set_yscale("symlog", linthresh=max(linthresh, 1e-12))
    _finish(fig, ax, path, drew, {"ncol": 2 if len(runs) > 1 else 1})
