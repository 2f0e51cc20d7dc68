"""``covrl report RUN_DIR [RUN_DIR ...] [--out DIR] [--labels a,b,c]``

Figures and a summary of one or more runs' entropy dynamics, read from each run's
``metrics.jsonl`` (and ``config.yaml`` for the run name and policy-loss method):

  entropy.png         mean token entropy vs step (p10-p90 band where logged), runs overlaid
  accuracy.png        held-out pass@1 vs step, with the batch reward/mean as a lighter line
  pass_at_k.png       held-out unbiased pass@k vs step, one line style per k (exploration kept or lost)
  law.png             pass@1 vs entropy with the fitted R = -a exp(H) + b and its ceiling -a + b
  entropy_change.png  predicted (-Cov(logp, A)) vs measured entropy change, Pearson r per run
  covariance.png      per-token covariance p50 / p99 / max vs step (symlog y)
  summary.md          a table per run, with the figures embedded; summary.json has the same numbers

Missing metrics never crash it: a run without data for a figure is left out of it, and a figure
with no data at all is still written, with a "no data" note. The law is fitted on the
(entropy/mean, eval/pass@1) pairs of each run; with fewer than 3 its fields are null.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.law import fit_law

FIGURES = (
    "entropy.png",
    "accuracy.png",
    "pass_at_k.png",
    "law.png",
    "entropy_change.png",
    "covariance.png",
)
PASS_AT_K_STYLES = ("-", "--", "-.", ":")
MIN_LAW_POINTS = 3
MIN_CORR_POINTS = 3
DPI = 120


class ReportError(ValueError):
    """Bad report input (a missing or unreadable metrics.jsonl, a --labels count mismatch)."""


# ----------------------------------------------------------------------------------------- loading


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{lineno}: expected a JSON object per line")
        rows.append(row)
    rows.sort(key=lambda r: r["step"] if isinstance(r.get("step"), int | float) else math.inf)
    return rows


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}  # the config only names the run; a broken one must not stop the report
    return data if isinstance(data, dict) else {}


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"dir", "rows", "name", "method"}`` of one run directory; ReportError without metrics.jsonl."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not metrics.is_file():
        raise ReportError(
            f"{run_dir}: no metrics.jsonl there — not a covrl run directory (or no step finished yet)"
        )
    cfg = _read_config(run_dir / "config.yaml")
    policy_loss = (
        ((cfg.get("algorithm") or {}).get("policy_loss") or {})
        if isinstance(cfg.get("algorithm"), dict)
        else {}
    )
    method = policy_loss.get("name") if isinstance(policy_loss, dict) else None
    name = cfg.get("name") if isinstance(cfg.get("name"), str) else None
    return {"dir": run_dir, "rows": _read_rows(metrics), "name": name, "method": method}


def _default_labels(runs: list[dict[str, Any]]) -> list[str]:
    labels = [r["name"] or r["method"] or r["dir"].name for r in runs]
    if len(set(labels)) < len(labels):  # same run name twice: tell them apart by method, then directory
        labels = [
            f"{lab} ({r['method']})" if r["method"] else lab for lab, r in zip(labels, runs, strict=True)
        ]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{r['dir'].name}]" for lab, r in zip(labels, runs, strict=True)]
    return labels


# ----------------------------------------------------------------------------------------- numbers


def _num(x: Any) -> float | None:
    """A finite float, or None (missing, non-numeric, NaN, inf)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows where ``key`` is a finite number."""
    pts = [(r.get("step"), _num(r.get(key))) for r in rows]
    pts = [(s, v) for s, v in pts if v is not None and _num(s) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts, strict=True)
    return np.asarray(steps, dtype=np.float64), np.asarray(vals, dtype=np.float64)


def paired(rows: list[dict[str, Any]], kx: str, ky: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) over the rows where both keys are finite numbers."""
    pts = [(_num(r.get(kx)), _num(r.get(ky))) for r in rows]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts, strict=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r, or None with fewer than MIN_CORR_POINTS points or a constant side."""
    if x.size < MIN_CORR_POINTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return _num(np.corrcoef(x, y)[0, 1])


def _first(vals: np.ndarray) -> float | None:
    return float(vals[0]) if vals.size else None


def _last(vals: np.ndarray) -> float | None:
    return float(vals[-1]) if vals.size else None


def _mean(vals: np.ndarray) -> float | None:
    return float(vals.mean()) if vals.size else None


def fit_run_law(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Law fields of one run; all None with fewer than MIN_LAW_POINTS points or an unfittable set."""
    h, r = paired(rows, "entropy/mean", "eval/pass@1")
    out: dict[str, Any] = {"a": None, "b": None, "r2": None, "ceiling": None, "n": int(h.size)}
    if h.size < MIN_LAW_POINTS:
        return out
    try:
        fit = fit_law(h, r)
    except ValueError:  # e.g. constant entropy: a and b are not identifiable
        return out
    out.update(a=_num(fit.a), b=_num(fit.b), r2=_num(fit.r2), ceiling=_num(fit.ceiling), n=fit.n)
    return out


def summarize(run: dict[str, Any], label: str) -> dict[str, Any]:
    """The summary numbers of one loaded run (JSON-ready: missing values are None)."""
    rows = run["rows"]
    steps, _ = series(rows, "step")
    _, ent = series(rows, "entropy/mean")
    _, evals = series(rows, "eval/pass@1")
    _, final = series(rows, "final/pass@1")
    _, cov = series(rows, "cov/mean")
    _, step_t = series(rows, "time/step")
    pred, meas = paired(rows, "entropy/predicted_change", "entropy/measured_change")
    return {
        "label": label,
        "run_dir": str(run["dir"]),
        "name": run["name"],
        "method": run["method"],
        "steps": int(steps.max()) if steps.size else 0,
        "rows": len(rows),
        "entropy_start": _first(ent),
        "entropy_end": _last(ent),
        "accuracy_start": _first(evals),
        "accuracy_end": _last(final) if final.size else _last(evals),
        "eval_points": int(evals.size),
        "law": fit_run_law(rows),
        "entropy_change_corr": pearson(pred, meas),
        "entropy_change_points": int(pred.size),
        "cov_frac_positive_steps": float((cov > 0).mean()) if cov.size else None,
        "mean_step_time_s": _mean(step_t),
        "warnings": sum(len(r["warnings"]) for r in rows if isinstance(r.get("warnings"), list)),
    }


# ----------------------------------------------------------------------------------------- figures


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
            (r["step"], _num(r.get("entropy/p10")), _num(r.get("entropy/p90")))
            for r in run["rows"]
            if _num(r.get("step")) is not None
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


def pass_at_k_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The ``eval/pass@k`` keys logged in ``rows``, by k."""
    keys = {k for r in rows for k in r if k.startswith("eval/pass@") and k[len("eval/pass@") :].isdigit()}
    return sorted(keys, key=lambda k: int(k.rsplit("@", 1)[1]))


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


# ----------------------------------------------------------------------------------------- summary


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def render_markdown(summaries: list[dict[str, Any]]) -> str:
    lines = ["# covrl report", ""]
    lines.append(
        "Law: R = −a·exp(H) + b fitted on (entropy/mean, eval/pass@1); ceiling = −a + b (R at H = 0)."
    )
    lines.append("")
    for s in summaries:
        law = s["law"]
        lines += [
            f"## {s['label']}",
            "",
            f"`{s['run_dir']}`",
            "",
            "| metric | value |",
            "|---|---|",
            f"| method | {s['method'] or 'n/a'} |",
            f"| steps | {s['steps']} |",
            f"| entropy start → end | {_fmt(s['entropy_start'])} → {_fmt(s['entropy_end'])} |",
            f"| accuracy start → end | {_fmt(s['accuracy_start'])} → {_fmt(s['accuracy_end'])} |",
            f"| law a | {_fmt(law['a'])} |",
            f"| law b | {_fmt(law['b'])} |",
            f"| law R² | {_fmt(law['r2'])} |",
            f"| law ceiling (−a+b) | {_fmt(law['ceiling'])} |",
            f"| law points | {law['n']} |",
            f"| corr(predicted, measured entropy change) | {_fmt(s['entropy_change_corr'], '.3f')} "
            f"(n={s['entropy_change_points']}) |",
            f"| fraction of steps with cov/mean > 0 | {_fmt(s['cov_frac_positive_steps'], '.3f')} |",
            f"| mean step time (s) | {_fmt(s['mean_step_time_s'], '.2f')} |",
            f"| warnings logged | {s['warnings']} |",
            "",
        ]
    lines += ["## Figures", ""]
    titles = {
        "entropy.png": "Entropy vs step",
        "accuracy.png": "Accuracy vs step",
        "pass_at_k.png": "pass@k vs step",
        "law.png": "Accuracy vs entropy (law fit)",
        "entropy_change.png": "Predicted vs measured entropy change",
        "covariance.png": "Covariance vs step",
    }
    for fig in FIGURES:
        lines += [f"### {titles[fig]}", "", f"![{titles[fig]}]({fig})", ""]
    return "\n".join(lines)


def build_report(run_dirs, out_dir, labels=None) -> dict[str, Any]:
    """Write the figures, summary.md and summary.json for ``run_dirs`` into ``out_dir``.

    Returns ``{"out_dir", "figures", "runs": [per-run summary, ...]}`` (the content of summary.json
    plus the figure paths). Raises ReportError on a run directory without metrics.jsonl or a
    ``labels`` list of the wrong length.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(d) for d in run_dirs]
    if labels is None:
        labels = _default_labels(runs)
    labels = [str(x) for x in labels]
    if len(labels) != len(runs):
        raise ReportError(f"{len(labels)} labels for {len(runs)} run directories; give one label per run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(r, lab) for r, lab in zip(runs, labels, strict=True)]

    plot_entropy(runs, labels, out / "entropy.png")
    plot_accuracy(runs, labels, out / "accuracy.png")
    plot_pass_at_k(runs, labels, out / "pass_at_k.png")
    plot_law(runs, labels, summaries, out / "law.png")
    plot_entropy_change(runs, labels, summaries, out / "entropy_change.png")
    plot_covariance(runs, labels, out / "covariance.png")

    (out / "summary.md").write_text(render_markdown(summaries))
    (out / "summary.json").write_text(json.dumps({"runs": summaries}, indent=2, allow_nan=False) + "\n")
    return {"out_dir": str(out), "figures": {f: str(out / f) for f in FIGURES}, "runs": summaries}


# ----------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="covrl report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output directory (default: RUN_DIR/report for one run, reports/<timestamp> for several)",
    )
    p.add_argument(
        "--labels",
        metavar="A,B,...",
        help="comma-separated legend labels, one per run "
        "(default: the run name from config.yaml, else the policy loss name)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if args.out:
        out = Path(args.out)
    elif len(args.run_dirs) == 1:
        out = Path(args.run_dirs[0]) / "report"
    else:
        out = Path("reports") / time.strftime("%Y%m%d-%H%M%S")
    try:
        result = build_report(args.run_dirs, out, labels)
    except ReportError as e:
        print(f"[covrl] error: {e}", file=sys.stderr, flush=True)
        return 2
    for s in result["runs"]:
        law = s["law"]
        print(
            f"{s['label']:<24} entropy {_fmt(s['entropy_start'])} -> {_fmt(s['entropy_end'])}   "
            f"pass@1 {_fmt(s['accuracy_start'], '.3f')} -> {_fmt(s['accuracy_end'], '.3f')}   "
            f"law b-a {_fmt(law['ceiling'], '.3f')} at H=0 (extrapolated, not an accuracy)"
        )
    print(f"report written to {result['out_dir']}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
