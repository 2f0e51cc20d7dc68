"""Run a reproduction study (configs/study/<study>/*.yaml): every arm x every seed with the same budget, one after
the other (pinned threads, so arms are comparable), then the analysis (pipeline.study: per-arm tables with
spread over seeds, paired differences to the GRPO baseline, per-arm figures) into OUT/study.md, and
`covrl report` over the first seed of every arm into OUT/report. Finished runs are kept, so an interrupted
study resumes where it stopped; --analyze-only rebuilds the tables and figures from what is there.

    .venv/bin/python bench/run_study.py --study addition --out runs/study                 # v1: all arms, seeds 0 1 2
    .venv/bin/python bench/run_study.py --study addition --arms grpo,clip_cov --seeds 0 --steps 30 --out runs/q
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.report import build_report  # noqa: E402
from pipeline.study import analyze  # noqa: E402
from pipeline.train import main as train_main  # noqa: E402

STUDIES = Path(__file__).resolve().parent.parent / "configs" / "study"
ORDER = ("grpo", "clip_higher", "clip_cov", "kl_cov", "entropy_bonus", "controller", "controller_clip")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--study", default="addition", choices=sorted(p.name for p in STUDIES.iterdir() if p.is_dir())
    )
    ap.add_argument("--arms", default=None, help="comma-separated arms (default: every config of the study)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="override schedule.steps of every arm")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--analyze-only", action="store_true", help="no training: analyse the finished runs")
    args = ap.parse_args()
    study = STUDIES / args.study
    arms_all = sorted((p.stem for p in study.glob("*.yaml")), key=lambda a: (ORDER + (a,)).index(a))
    arms = args.arms.split(",") if args.arms else arms_all
    unknown = sorted(set(arms) - set(arms_all))
    if unknown:
        raise SystemExit(f"[study] no config for arm(s) {unknown} in {study}: choose from {arms_all}")
    out = Path(args.out).resolve()
    todo = [(arm, seed) for seed in args.seeds for arm in arms]  # seed-major: every arm gets seed 0 first
    runs: dict[str, dict[int, Path]] = {arm: {} for arm in arms}
    t_start = time.perf_counter()
    for k, (arm, seed) in enumerate(todo, start=1):
        run_dir = out / f"{arm}-seed{seed}"
        if not (run_dir / "summary.json").exists():
            if args.analyze_only:
                continue
            sets = [f"run_dir={run_dir}", f"schedule.seed={seed}", f"data.seed={seed}"]
            sets += [f"schedule.steps={args.steps}"] if args.steps else []
            argv = ["--config", str(study / f"{arm}.yaml"), *[x for s in sets for x in ("--set", s)]]
            elapsed = (time.perf_counter() - t_start) / 60
            print(
                f"[study] run {k}/{len(todo)} {run_dir.name}: training ({elapsed:.0f} min so far)", flush=True
            )
            if train_main(argv) != 0:
                raise SystemExit(f"[study] {run_dir.name} failed")
        runs[arm][seed] = run_dir
    runs = {arm: by_seed for arm, by_seed in runs.items() if by_seed}
    if not runs:
        raise SystemExit(f"[study] no finished run under {out} (a run is finished when it has summary.json)")
    result = analyze(runs, out, baseline="grpo")
    firsts = [by_seed[min(by_seed)] for by_seed in runs.values()]
    build_report(firsts, out / "report", labels=[d.name for d in firsts])
    print((out / "study.md").read_text())
    print(f"figures: {', '.join(result['figures'])} and {out / 'report'}")


if __name__ == "__main__":
    main()
