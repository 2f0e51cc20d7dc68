"""Run the reproduction study (configs/study/*.yaml): every arm x every seed with the same budget, one after
the other (pinned threads, so arms are comparable), then `covrl report` over all runs and a per-arm table
(mean and spread over seeds) in OUT/study.md.

    .venv/bin/python bench/run_study.py                          # all arms, seeds 0 1 2, 60 steps
    .venv/bin/python bench/run_study.py --arms grpo,clip_cov --seeds 0 --steps 30 --out runs/study-quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.report import build_report  # noqa: E402
from pipeline.train import main as train_main  # noqa: E402

STUDY = Path(__file__).resolve().parent.parent / "configs" / "study"


def _col(getters, key):
    return [get(key) for get in getters]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default=",".join(sorted(p.stem for p in STUDY.glob("*.yaml"))))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="override schedule.steps of every arm")
    ap.add_argument("--out", default="runs/study")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    runs: dict[str, list[Path]] = {}
    for arm in args.arms.split(","):
        for seed in args.seeds:
            run_dir = out / f"{arm}-seed{seed}"
            if (run_dir / "summary.json").exists():
                print(f"[study] {run_dir.name}: done already, kept")
            else:
                sets = [f"run_dir={run_dir}", f"schedule.seed={seed}", f"data.seed={seed}"]
                sets += [f"schedule.steps={args.steps}"] if args.steps else []
                argv = ["--config", str(STUDY / f"{arm}.yaml"), *[x for s in sets for x in ("--set", s)]]
                print(f"[study] {run_dir.name}: training", flush=True)
                if train_main(argv) != 0:
                    raise SystemExit(f"[study] {run_dir.name} failed")
            runs.setdefault(arm, []).append(run_dir)
    all_dirs = [d for dirs in runs.values() for d in dirs]
    report = build_report(all_dirs, out / "report", labels=[d.name for d in all_dirs])
    by_run = {Path(r["run_dir"]).name: r for r in report["runs"]}
    lines = [
        "| arm | seeds | entropy start → end | pass@1 start → end (mean ± sd) | law a | law b | R² | ceiling | corr(pred, meas dH) | steps with cov > 0 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "n/a"
        return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")

    for arm, dirs in runs.items():
        rs = [by_run[d.name] for d in dirs]
        g = [r.get for r in rs]
        law = [(r.get("law") or {}).get for r in rs]
        lines.append(
            f"| {arm} | {len(rs)} | {ms(_col(g, 'entropy_start'))} → {ms(_col(g, 'entropy_end'))} | "
            f"{ms(_col(g, 'accuracy_start'))} → {ms(_col(g, 'accuracy_end'))} | {ms(_col(law, 'a'))} | {ms(_col(law, 'b'))} | {ms(_col(law, 'r2'))} | "
            f"{ms(_col(law, 'ceiling'))} | {ms(_col(g, 'entropy_change_corr'))} | {ms(_col(g, 'cov_frac_positive_steps'))} |"
        )
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps(report, indent=1, default=str))
    print("\n".join(lines))
    print(f"\nfigures: {out / 'report'}")


if __name__ == "__main__":
    main()
