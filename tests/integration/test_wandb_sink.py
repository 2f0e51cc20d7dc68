"""Weights & Biases as a metrics sink, offline (no network): the run's .wandb file, read back with
wandb's own reader (``wandb leet inspect --json``), holds every step's metrics with their values."""

from __future__ import annotations

import sys

import pytest
import yaml

from actors.metrics import Metrics, check_wandb
from schemas.batches import MetricsRecord
from schemas.run_config import MetricsConfig, WandbConfig
from tests.helpers import wandb_records

ENTROPY = [0.9, 0.7, 0.5, 0.4]


def test_offline_wandb_run_holds_the_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the config's dir must win
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"schedule": {"steps": 4}}))
    wandb_cfg = WandbConfig(enabled=True, project="covrl-test", mode="offline", dir=str(tmp_path / "wb"))
    metrics = Metrics(MetricsConfig(tensorboard=False, wandb=wandb_cfg), str(run_dir))
    for step, h in enumerate(ENTROPY, start=1):
        metrics.record(
            MetricsRecord(step=step, role="learner", metrics={"entropy/mean": h, "reward/mean": step / 10})
        )
        metrics.flush_step(step)
    metrics.close()

    records = wandb_records(tmp_path / "wb")
    (run,) = [r["run"] for r in records if r.get("type") == "run"]
    assert run["project"] == "covrl-test" and run["display_name"] == "run"  # name defaults to the run dir's
    assert run["config"]["update"]["schedule"] == {"steps": 4}  # the run's config.yaml
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    assert [h["entropy/mean"] for h in history] == pytest.approx(ENTROPY)
    assert [h["reward/mean"] for h in history] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # Derived metrics reach W&B too, the same values as metrics.jsonl.
    assert [h["entropy/relative"] for h in history] == pytest.approx([h / ENTROPY[0] for h in ENTROPY])
    assert not (tmp_path / "elsewhere").exists()


def test_enabled_wandb_that_cannot_be_imported_is_a_config_error(monkeypatch):
    check_wandb(WandbConfig())  # off by default: nothing to check
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python reports a package that is not there
    with pytest.raises(ValueError, match=r"metrics.wandb.enabled: the wandb package cannot be imported"):
        check_wandb(WandbConfig(enabled=True))


def test_cli_refuses_enabled_wandb_without_the_package_before_ray_starts():
    """The real CLI in a fresh process where wandb cannot be imported: exit 2 naming the field, no Ray."""
    import subprocess
    from pathlib import Path

    code = (
        "import sys; sys.modules['wandb'] = None; import ray; from pipeline.train import main; "
        "rc = main(sys.argv[1:]); sys.exit(rc + (100 if ray.is_initialized() else 0))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "--set", "metrics.wandb.enabled=true"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "metrics.wandb.enabled: the wandb package cannot be imported" in res.stderr, res.stderr[-2000:]
