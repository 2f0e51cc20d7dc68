"""The metrics role as a Ray actor with the W&B sink on, offline: what the roles record reaches the
actor's W&B run (the same sink the unit of ``actors/metrics.py`` is tested with in-process)."""

from __future__ import annotations

import pytest

from actors.metrics import Metrics
from schemas.batches import MetricsRecord
from schemas.run_config import MetricsConfig, WandbConfig
from tests.helpers import wandb_records

pytestmark = pytest.mark.ray


def test_metrics_actor_logs_to_an_offline_wandb_run(ray_cluster, tmp_path):
    cfg = MetricsConfig(tensorboard=False, wandb=WandbConfig(enabled=True, name="ray-run", mode="offline"))
    offline = {"env_vars": {"WANDB_MODE": "offline"}}  # belt and braces: the config says offline too
    actor = ray_cluster.remote(num_cpus=0, max_restarts=0, runtime_env=offline)(Metrics).remote(
        cfg, str(tmp_path)
    )
    entropy = [0.8, 0.6, 0.3]
    for step, h in enumerate(entropy, start=1):
        ray_cluster.get(
            actor.record.remote(MetricsRecord(step=step, role="learner", metrics={"entropy/mean": h}))
        )
        ray_cluster.get(actor.flush_step.remote(step))
    ray_cluster.get(actor.close.remote())
    ray_cluster.kill(actor)
    records = wandb_records(tmp_path)  # dir unset: the W&B run lives in the run directory
    (run,) = [r["run"] for r in records if r.get("type") == "run"]
    assert run["display_name"] == "ray-run" and run["project"] == "covrl"
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert [h["entropy/mean"] for h in history] == pytest.approx(entropy)
    assert [h["_step"] for h in history] == [1, 2, 3]
