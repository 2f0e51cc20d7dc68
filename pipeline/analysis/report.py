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
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.analysis.report_figures import (
    FIGURES,
    plot_accuracy,
    plot_covariance,
    plot_entropy,
    plot_entropy_change,
    plot_law,
    plot_pass_at_k,
)
from pipeline.analysis.runs import (
    ReportError,
    default_labels,
    first_value,
    fit_run_law,
    last_value,
    load_run,
    mean_value,
    paired,
    pearson,
    series,
)

__all__ = ["FIGURES", "ReportError", "build_report", "main", "summarize"]


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
        "entropy_start": first_value(ent),
        "entropy_end": last_value(ent),
        "accuracy_start": first_value(evals),
        "accuracy_end": last_value(final) if final.size else last_value(evals),
        "eval_points": int(evals.size),
        "law": fit_run_law(rows),
        "entropy_change_corr": pearson(pred, meas),
        "entropy_change_points": int(pred.size),
        "cov_frac_positive_steps": float((cov > 0).mean()) if cov.size else None,
        "mean_step_time_s": mean_value(step_t),
        "warnings": sum(len(r["warnings"]) for r in rows if isinstance(r.get("warnings"), list)),
    }


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
        labels = default_labels(runs)
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
