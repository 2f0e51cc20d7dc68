"""Atomic checkpoints and the metrics actor's resume behaviour (in-process, no Ray)."""

import json

import pytest

from actors.metrics import Metrics
from pipeline.driver import checkpoint as ckpt
from schemas.batches import MetricsRecord
from schemas.run_config import MetricsConfig


def write_ckpt(run_dir, step, keep=2):
    partial = ckpt.begin(run_dir, step)
    (partial / "learner").mkdir()
    (partial / "learner" / "weights.bin").write_bytes(b"x" * 10)
    return ckpt.commit(
        partial,
        ckpt.DriverState(
            step=step, policy_version=step, data_state={"epoch": 0, "position": step}, rng_seed=0
        ),
        keep=keep,
    )


def test_latest_points_at_the_newest_complete_checkpoint(tmp_path):
    assert ckpt.latest(tmp_path) is None
    write_ckpt(tmp_path, 1)
    write_ckpt(tmp_path, 2)
    ckpt.begin(tmp_path, 3)  # a crash mid-checkpoint leaves only a .partial dir
    latest = ckpt.latest(tmp_path)
    assert latest.name == "step_000002"
    assert ckpt.load_state(latest).data_state == {"epoch": 0, "position": 2}
    assert ckpt.clean_partials(tmp_path) == 1


def test_old_checkpoints_are_pruned(tmp_path):
    for s in range(1, 5):
        write_ckpt(tmp_path, s, keep=2)
    names = sorted(p.name for p in ckpt.checkpoint_root(tmp_path).iterdir() if p.is_dir())
    assert names == ["step_000003", "step_000004"]


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocked = tmp_path / "run"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the directory should be (works as root too)")
    with pytest.raises(ckpt.CheckpointError, match="cannot create checkpoint directory"):
        ckpt.begin(blocked, 2)


def test_failed_commit_keeps_previous_checkpoint(tmp_path, monkeypatch):
    write_ckpt(tmp_path, 1)
    partial = ckpt.begin(tmp_path, 2)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        ckpt.commit(partial, ckpt.DriverState(step=2, policy_version=2, data_state={}, rng_seed=0), keep=2)
    monkeypatch.undo()
    assert ckpt.latest(tmp_path).name == "step_000001"


def flush(m, step, **metrics):
    m.record(MetricsRecord(step=step, role="driver", metrics=metrics))
    return m.flush_step(step)


def test_metrics_resume_truncates_steps_after_the_checkpoint(tmp_path):
    cfg = MetricsConfig(tensorboard=False)
    m = Metrics(cfg, str(tmp_path))
    for s in range(1, 6):
        flush(m, s, **{"entropy/mean": 1.0 / s})
    # crash after step 5, checkpoint at step 3: resume appends from step 4 without duplicates
    m2 = Metrics(cfg, str(tmp_path), resume_after_step=3)
    for s in range(4, 7):
        flush(m2, s, **{"entropy/mean": 1.0 / s})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_records_from_several_roles_merge_and_alerts_fire(tmp_path):
    m = Metrics(MetricsConfig(tensorboard=True, collapse_fraction=0.5), str(tmp_path))
    flush(m, 1, **{"entropy/mean": 1.0})
    m.record(MetricsRecord(step=2, role="generator", replica=1, node_id="n1", metrics={"time/generate": 2.0}))
    row = flush(m, 2, **{"entropy/mean": 0.4})
    assert row["time/generate"] == 2.0 and row["alert/entropy_collapse"] == 1.0
    assert {"role": "generator", "replica": 1, "node_id": "n1"} in row["sources"]
    assert any("collapse" in w for w in row["warnings"])
    assert list((tmp_path / "tensorboard").iterdir())


def test_law_is_fitted_live_from_eval_points(tmp_path):
    import math

    m = Metrics(MetricsConfig(tensorboard=False), str(tmp_path))
    a, b = 0.5, 1.2
    for s, h in enumerate([1.0, 0.8, 0.6, 0.4, 0.2], start=1):
        row = flush(m, s, **{"entropy/mean": h, "eval/pass@1": -a * math.exp(h) + b})
    assert row["law/a"] == pytest.approx(a, rel=1e-6)
    assert row["law/ceiling"] == pytest.approx(b - a, rel=1e-6)


def test_predicted_vs_measured_entropy_change_correlation_is_live(tmp_path):
    m = Metrics(MetricsConfig(tensorboard=False), str(tmp_path))
    pred = [-0.1, -0.05, -0.2, -0.01, -0.15]
    for s, p in enumerate(pred, start=1):
        row = flush(m, s, **{"entropy/predicted_change": p, "entropy/measured_change": 2 * p + 0.001 * s})
    assert row["entropy/change_correlation"] == pytest.approx(1.0, abs=1e-3)
    assert "entropy/change_correlation" not in m.rows()[1]  # needs 3 points


def test_consecutive_all_skipped_steps_stop_the_run():
    from pipeline.driver.trainer import TrainingDiverged, track_bad_steps

    bad = {"actor/skipped_updates": 4.0, "actor/updates": 4.0}
    partly = {"actor/skipped_updates": 1.0, "actor/updates": 4.0}
    n = track_bad_steps(0, bad, step=1, limit=3, run_dir="r")
    n = track_bad_steps(n, partly, step=2, limit=3, run_dir="r")  # one good update resets the count
    assert n == 0
    n = track_bad_steps(
        track_bad_steps(n, bad, step=3, limit=3, run_dir="r"), bad, step=4, limit=3, run_dir="r"
    )
    with pytest.raises(TrainingDiverged, match="3 consecutive steps.*--resume r"):
        track_bad_steps(n, bad, step=5, limit=3, run_dir="r")
