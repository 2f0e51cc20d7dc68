"""Run a reproduction study (configs/study/<study>/*.yaml): every arm x every seed with the same budget, one after
the other (pinned threads, so arms are comparable), then the analysis (pipeline.analysis.study: per-arm tables with
spread over seeds, paired differences to the GRPO baseline, per-arm figures) into OUT/study.md, and
`covrl report` over the first seed of every arm into OUT/report. Finished runs are kept and a run cut off
mid-way continues from its latest checkpoint, so an interrupted study resumes where it stopped (run it from
a fixed commit: the runs must not pick up code edited meanwhile); --analyze-only rebuilds the tables and
figures from what is there. After every finished run the analysis is refreshed, and with --publish DIR its
tables and figures, and each finished run's small files (metrics.jsonl, summary.json, config.yaml), are
copied to DIR (e.g. docs/results/countdown) so partial results can be committed; a later session (a fresh
checkout without the run directories) restores the published runs from DIR and trains only the rest.

    .venv/bin/python bench/run_study.py --study addition --out runs/study                 # v1: all arms, seeds 0 1 2
    .venv/bin/python bench/run_study.py --study addition --arms grpo,clip_cov --seeds 0 --steps 30 --out runs/q
    .venv/bin/python bench/run_study.py --study countdown --out runs/study2 --publish docs/results/countdown
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.analysis.report import build_report  # noqa: E402
from pipeline.analysis.study import analyze, arm_sort_key  # noqa: E402
from pipeline.driver import checkpoint as ckpt  # noqa: E402
from pipeline.train import main as train_main  # noqa: E402

STUDIES = Path(__file__).resolve().parent.parent / "configs" / "study"


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
    ap.add_argument("--publish", default=None, help="copy study.md/json and figures here after every run")
    args = ap.parse_args()
    study = STUDIES / args.study
    arms_all = sorted((p.stem for p in study.glob("*.yaml")), key=lambda a: (arm_sort_key(a), a))
    arms = args.arms.split(",") if args.arms else arms_all
    unknown = sorted(set(arms) - set(arms_all))
    if unknown:
        raise SystemExit(f"[study] no config for arm(s) {unknown} in {study}: choose from {arms_all}")
    out = Path(args.out).resolve()
    if args.publish:
        _restore_published(Path(args.publish), out)
    todo = [(arm, seed) for seed in args.seeds for arm in arms]  # seed-major: every arm gets seed 0 first
    runs: dict[str, dict[int, Path]] = {arm: {} for arm in arms}
    t_start = time.perf_counter()
    for k, (arm, seed) in enumerate(todo, start=1):
        run_dir = out / f"{arm}-seed{seed}"
        if not (run_dir / "summary.json").exists():
            if args.analyze_only:
                continue
            elapsed = (time.perf_counter() - t_start) / 60
            if ckpt.latest(run_dir) is not None:
                print(
                    f"[study] run {k}/{len(todo)} {run_dir.name}: resuming ({elapsed:.0f} min so far)",
                    flush=True,
                )
                argv = ["--resume", str(run_dir)]
            else:
                shutil.rmtree(run_dir, ignore_errors=True)  # cut off before its first checkpoint: start over
                sets = [f"run_dir={run_dir}", f"schedule.seed={seed}", f"data.seed={seed}"]
                sets += [f"schedule.steps={args.steps}"] if args.steps else []
                argv = ["--config", str(study / f"{arm}.yaml"), *[x for s in sets for x in ("--set", s)]]
                print(
                    f"[study] run {k}/{len(todo)} {run_dir.name}: training ({elapsed:.0f} min so far)",
                    flush=True,
                )
            if train_main(argv) != 0:
                raise SystemExit(f"[study] {run_dir.name} failed")
            runs[arm][seed] = run_dir
            _analyze(runs, out, args.publish, report=False)
        runs[arm][seed] = run_dir
    _analyze(runs, out, args.publish, report=True)
    print((out / "study.md").read_text())


RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml")


def _restore_published(publish: Path, out: Path) -> None:
    """Finished runs published by an earlier session (their small files) count as finished here."""
    for src in sorted((publish / "runs").glob("*/summary.json")):
        dest = out / src.parent.name
        if not (dest / "summary.json").exists():
            dest.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                if (src.parent / name).exists():
                    shutil.copy2(src.parent / name, dest / name)
            print(f"[study] {dest.name}: restored from {publish}", flush=True)


def _analyze(runs: dict[str, dict[int, Path]], out: Path, publish: str | None, *, report: bool) -> None:
    """Tables and figures of the finished runs (and `covrl report` over each arm's first seed)."""
    done = {arm: by_seed for arm, by_seed in runs.items() if by_seed}
    if not done:
        raise SystemExit(f"[study] no finished run under {out} (a run is finished when it has summary.json)")
    result = analyze(done, out, baseline="grpo")
    if report:
        firsts = [by_seed[min(by_seed)] for by_seed in done.values()]
        build_report(firsts, out / "report", labels=[d.name for d in firsts])
    if publish:
        dest = Path(publish)
        dest.mkdir(parents=True, exist_ok=True)
        for path in [out / "study.md", out / "study.json", *map(Path, result["figures"])]:
            shutil.copy2(path, dest / path.name)
        for run_dir in (d for by_seed in done.values() for d in by_seed.values()):
            (dest / "runs" / run_dir.name).mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                if (run_dir / name).exists():
                    shutil.copy2(run_dir / name, dest / "runs" / run_dir.name / name)
        if report:
            shutil.copytree(out / "report", dest / "report", dirs_exist_ok=True)
    print(f"[study] analysis of {sum(map(len, done.values()))} finished runs in {out}", flush=True)


if __name__ == "__main__":
    main()
