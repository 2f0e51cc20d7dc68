"""Short-budget version of the reproduction study (docs/results.md), run in CI as a regression test.

The study's own arm configs (configs/study/addition/) on half of its budget -- 30 of 60 steps, same seed, no
periodic evaluation -- through the real pipeline. It asserts only signs that held on every seed of the
full study at this point of training, with margins well above the seed-to-seed spread:
- GRPO's entropy falls (last 5 of 30 steps over the first 3: 0.59-0.60 on the study's seeds);
- its covariance is positive (100% of steps in the study);
- over steps 11-30, Clip-Cov kept 9.6-10.9% and KL-Cov 5.6-5.8% more mean entropy than GRPO on every
  seed, while GRPO's own mean varied by 0.6% between seeds.
Sizing notes: at 20 steps KL-Cov's margin was only 1.2-3.5% (too thin for CI); with 16 prompts per step
the per-step entropy swung by +-0.01 and the drop was not visible within 15 steps (tried).

The three arms run at once, each as its own ``python -m pipeline.train`` with one thread per role, instead
of one after the other with two: a run alternates between generating and learning, so one run leaves a core
idle most of the time. Measured side by side on 2 cores: 381 s for the three arms at once against 529 s in
sequence. At this test's budget (seed 0) the thread count moved the first step's entropy by < 1e-5 and left
every asserted margin in place: GRPO 0.56x, Clip-Cov +15%, KL-Cov +19% at one thread; 0.55x, +15%, +15% at
two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "configs" / "study" / "addition"
ARMS = ("grpo", "clip_cov", "kl_cov")
BUDGET = {
    "schedule.steps": 30,
    "schedule.eval_every": 0,
    "schedule.eval_prompts": 64,
    "schedule.eval_samples": 1,
    "schedule.checkpoint_every": 0,
    "schedule.seed": 0,
    "data.seed": 0,
    "metrics.tensorboard": "false",
    "metrics.inspector_every": 0,
    # the measured entropy change is not asserted here: skip its extra forward over every batch (it only
    # reads the weights, so the trajectory is the study's)
    "learner.measure_entropy_change_every": 0,
    "generator.threads": 1,
    "learner.threads": 1,
}


def start_arm(arm: str, root: Path) -> subprocess.Popen:
    """The arm's training run as its own process (and its own local Ray), its output in ``<arm>.log``."""
    sets = BUDGET | {"run_dir": f"{root}/{arm}"}
    argv = [
        sys.executable,
        "-m",
        "pipeline.train",
        "--config",
        str(STUDY / f"{arm}.yaml"),
        *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")],
    ]
    with open(root / f"{arm}.log", "w") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    procs = {arm: start_arm(arm, root) for arm in ARMS}
    deadline = time.monotonic() + 1800
    try:
        codes = {arm: p.wait(timeout=max(1.0, deadline - time.monotonic())) for arm, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:  # a run past the deadline: take its session (its Ray included) with it
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    failed = {arm: (root / f"{arm}.log").read_text()[-3000:] for arm, code in codes.items() if code != 0}
    assert not failed, failed
    return {
        arm: [json.loads(x) for x in (root / arm / "metrics.jsonl").read_text().splitlines()] for arm in ARMS
    }


def entropy(rows: list[dict]) -> np.ndarray:
    return np.array([r["entropy/mean"] for r in rows])


def test_entropy_collapses_under_the_baseline_with_positive_covariance(arms):
    h = entropy(arms["grpo"])
    assert h[-5:].mean() < 0.8 * h[:3].mean(), h  # claim 1: a clear drop within 30 steps (study: ~0.6x)
    assert np.mean([r["cov/mean"] > 0 for r in arms["grpo"]]) >= 0.9  # claim 3: covariance mostly positive


@pytest.mark.parametrize("arm", ["clip_cov", "kl_cov"])
def test_covariance_arms_keep_more_entropy_than_the_baseline(arms, arm):
    base, ours = entropy(arms["grpo"]), entropy(arms[arm])
    assert base[0] == pytest.approx(ours[0], rel=1e-4)  # same seed: same first rollout and weights
    assert ours[10:].mean() > 1.02 * base[10:].mean(), (arm, ours, base)  # claim 4, entropy half
    assert all(r["actor/cov/selected_frac"] > 0 for r in arms[arm])  # the intervention acted every step
