"""One-step-async vs synchronous steps on the default job: mean step time (eval excluded) and held-out
accuracy after the same number of steps, run one after the other in one invocation.

Target (issue 8): async step time / sync step time <= 0.75 with accuracy not worse beyond noise.
On 2 CPU cores the generator and learner share the same cores, so the overlap can only win what one
role leaves idle; thread splits are part of the comparison.
    .venv/bin/python bench/bench_async.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.train import main as train_main  # noqa: E402

ARMS = {
    "sync (gen 2 thr, learner 2 thr)": ["schedule.mode=sync"],
    "async (gen 1 thr, learner 1 thr)": ["schedule.mode=async", "generator.threads=1", "learner.threads=1"],
    "async (gen 2 thr, learner 2 thr)": ["schedule.mode=async"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="covrl-bench-async-"))
    results = {}
    for i, (name, extra) in enumerate(ARMS.items()):
        sets = [
            f"schedule.steps={args.steps}",
            "schedule.eval_every=0",
            "metrics.tensorboard=false",
            f"run_dir={out}/arm{i}",
            "schedule.checkpoint_every=0",
            *extra,
        ]
        assert train_main([x for s in sets for x in ("--set", s)]) == 0
        rows = [json.loads(x) for x in (out / f"arm{i}" / "metrics.jsonl").read_text().splitlines()]
        steady = rows[2:-1]  # skip warm-up and the last step (final eval)
        results[name] = {
            "step_s": sum(r["time/step"] - r.get("time/eval", 0.0) for r in steady) / len(steady),
            "acc_before": rows[0]["eval/pass@1"],
            "acc_after": rows[-1]["final/pass@1"],
            "lag": max(r["version_lag"] for r in rows),
        }
    base = results["sync (gen 2 thr, learner 2 thr)"]["step_s"]
    print(f"\n{args.steps} steps per arm, default job otherwise")
    print(f"{'arm':34} {'s/step':>7} {'vs sync':>8} {'pass@1 before->after':>22} {'max lag':>8}")
    for name, r in results.items():
        print(
            f"{name:34} {r['step_s']:7.2f} {r['step_s'] / base:8.3f} {r['acc_before']:>10.3f} -> {r['acc_after']:.3f} {r['lag']:8.0f}"
        )


if __name__ == "__main__":
    main()
