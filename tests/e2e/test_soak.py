"""Soak: 200 steps of the default job (reduced batch) with memory flat in every role.

Not in the default run (marker `soak`); run it with:  .venv/bin/python -m pytest -m soak
"""

import json

import pytest

from pipeline.train import main as train_main

pytestmark = [pytest.mark.soak, pytest.mark.e2e]


def test_rss_of_each_role_is_flat_after_warm_up(tmp_path):
    overrides = {
        "schedule.steps": 200,
        "schedule.prompts_per_step": 16,
        "schedule.group_size": 4,
        "schedule.eval_every": 50,
        "schedule.eval_prompts": 32,
        "schedule.checkpoint_every": 50,
        "learner.mini_batches": 2,
        "metrics.tensorboard": "false",
        "run_dir": f"{tmp_path}/soak",
    }
    assert train_main([x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "soak" / "metrics.jsonl").read_text().splitlines()]
    keys = sorted({k for r in rows for k in r if k.endswith("/rss_mb")})
    assert keys, "roles report their RSS"
    for key in keys:
        warm = next(r[key] for r in rows if r["step"] >= 50 and key in r)
        last = [r[key] for r in rows if key in r][-1]
        assert abs(last - warm) <= 0.10 * warm, (
            f"{key}: {warm:.0f} MiB at step 50 -> {last:.0f} MiB at the end"
        )
