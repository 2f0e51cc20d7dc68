"""One-step-async vs synchronous steps on the default job: mean step time (eval excluded) and held-out
accuracy after the same number of steps, run one after the other in one invocation.

Target (issue 8): async step time / sync step time <= 0.75 with accuracy not worse beyond noise.
On 2 CPU cores the generator and learner share the same cores, so the overlap can only win what one
role leaves idle. Arms: fixed threads (each role keeps 2 threads, the cores are oversubscribed) and core
lending (`learner.threads_while_generating=1`: the learner drops to 1 thread while the generator, on 1
thread, generates, and takes both back when it is done; actors/core_share.py); each in fp32 and bf16.
    .venv/bin/python bench/bench_async.py [--steps 25] [--skip-bf16]
    .venv/bin/python bench/bench_async.py --accuracy-seeds 3     # accuracy, sync vs async, seed by seed
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.train import main as train_main  # noqa: E402

BF16 = ["learner.dtype=bfloat16", "generator.engine_kwargs={dtype: bfloat16}"]
LEND = ["schedule.mode=async", "generator.threads=1", "learner.threads_while_generating=1"]
ARMS = {  # name -> (overrides, the sync arm it is compared with)
    "sync fp32": ([], "sync fp32"),
    "async fixed 2+2 thr fp32": (["schedule.mode=async"], "sync fp32"),
    "async lend fp32": (LEND, "sync fp32"),
    "sync bf16": (BF16, "sync bf16"),
    "async lend bf16": (LEND + BF16, "sync bf16"),
}


def run_arm(run_dir: Path, steps: int, extra: list[str], seed: int = 0) -> dict[str, float]:
    sets = [
        f"schedule.steps={steps}",
        f"schedule.seed={seed}",
        "schedule.eval_every=0",
        "metrics.tensorboard=false",
        f"run_dir={run_dir}",
        "schedule.checkpoint_every=0",
        *extra,
    ]
    assert train_main([x for s in sets for x in ("--set", s)]) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:-1]  # skip warm-up and the last step (final eval)
    return {
        "step_s": sum(r["time/step"] - r.get("time/eval", 0.0) for r in steady) / len(steady),
        "learner_s": sum(r["time/learner"] for r in steady) / len(steady),
        "lent_s": sum(r.get("time/learner_cores_lent", 0.0) for r in steady) / len(steady),
        "acc_before": rows[0]["eval/pass@1"],
        "acc_after": rows[-1]["final/pass@1"],
        "lag": max(r["version_lag"] for r in rows),
    }


def timing_table(args, out: Path) -> None:
    results = {}
    for i, (name, (extra, _)) in enumerate(ARMS.items()):
        if not (args.skip_bf16 and "bf16" in name):
            results[name] = run_arm(out / f"arm{i}", args.steps, extra)
    print(f"\n{args.steps} steps per arm, default job otherwise (steps 3..{args.steps - 1}, eval excluded)")
    print(
        f"{'arm':26} {'s/step':>7} {'vs sync':>8} {'learner s':>10} {'cores lent s':>13} "
        f"{'pass@1 before->after':>22} {'max lag':>8}"
    )
    for name, r in results.items():
        base = results[ARMS[name][1]]["step_s"]
        print(
            f"{name:26} {r['step_s']:7.2f} {r['step_s'] / base:8.3f} {r['learner_s']:10.2f} {r['lent_s']:13.2f} "
            f"{r['acc_before']:>10.3f} -> {r['acc_after']:.3f} {r['lag']:8.0f}"
        )


def accuracy_table(args, out: Path) -> None:
    """Held-out pass@1 after the same steps, sync vs async (core lending, fp32), seed by seed: is async's
    accuracy worse beyond the seed-to-seed spread?"""
    import numpy as np

    acc = {"sync": [], "async": []}
    for seed in range(args.accuracy_seeds):
        for mode, extra in (("sync", []), ("async", LEND)):
            acc[mode].append(run_arm(out / f"{mode}-seed{seed}", args.steps, extra, seed)["acc_after"])
    sync, asy = np.array(acc["sync"]), np.array(acc["async"])
    diff = asy - sync
    print(f"\nheld-out pass@1 after {args.steps} steps, fp32, seeds 0..{args.accuracy_seeds - 1}")
    print(f"{'seed':>4} {'sync':>7} {'async':>7} {'async - sync':>13}")
    for i in range(len(sync)):
        print(f"{i:4d} {sync[i]:7.3f} {asy[i]:7.3f} {diff[i]:+13.3f}")
    print(
        f"mean {sync.mean():7.3f} {asy.mean():7.3f} {diff.mean():+13.3f}  (sd over seeds: sync {sync.std(ddof=1):.3f}, "
        f"async {asy.std(ddof=1):.3f}, difference {diff.std(ddof=1):.3f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument(
        "--accuracy-seeds",
        type=int,
        default=0,
        help="instead of the timing table: sync vs async accuracy over this many seeds (>= 2)",
    )
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="covrl-bench-async-"))
    if args.accuracy_seeds:
        accuracy_table(args, out)
    else:
        timing_table(args, out)


if __name__ == "__main__":
    main()
