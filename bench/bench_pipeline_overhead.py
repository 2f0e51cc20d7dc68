"""Pipeline overhead of a synchronous step: step wall time (evaluation excluded) divided by the sum of the
roles' own compute time as each role measures it inside its actor (generation, verification, reference,
learner update). The rest is the driver, serialization, object-store transfers and weight sync.
Target (issue 8): <= 1.10.

    .venv/bin/python bench/bench_pipeline_overhead.py RUN_DIR        # an existing sync run
    .venv/bin/python bench/bench_pipeline_overhead.py --steps 20     # runs a short default job first
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ratios(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = []
    for r in rows[1:]:  # step 1 includes warm-up
        own = r.get("generator/0/time/generate", 0.0) + r.get("verifier/time_s", 0.0)
        own += r.get("learner/0/time", 0.0) + r.get("reference/0/time", 0.0)
        wall = r["time/step"]  # eval is outside time/step
        if own > 0:
            out.append(wall / own)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None:
        from pipeline.train import main as train_main

        run_dir = Path(tempfile.mkdtemp(prefix="covrl-bench-overhead-")) / "run"
        sets = [
            f"schedule.steps={args.steps}",
            "schedule.eval_every=0",
            "metrics.tensorboard=false",
            f"run_dir={run_dir}",
        ]
        assert train_main([x for s in sets for x in ("--set", s)]) == 0
    r = ratios(run_dir)
    print(f"{len(r)} steps of {run_dir}")
    print(
        f"step wall / sum of roles' own compute: min {min(r):.3f}, median {statistics.median(r):.3f}, "
        f"max {max(r):.3f} -> {'PASS' if statistics.median(r) <= 1.10 else 'FAIL'} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
