"""Metrics role: one named actor that every role on every node reports to.

It merges the records of a step (tagged with role, replica and node), derives the live
entropy-performance law and the collapse/surge alerts, and writes ``metrics.jsonl`` (one line per
step, stable metric names) plus TensorBoard events and, when ``metrics.wandb.enabled``, a Weights &
Biases run. Holds no model and no accelerator.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actors._runtime import where
from schemas.batches import MetricsRecord

if TYPE_CHECKING:
    from schemas.run_config import MetricsConfig, WandbConfig

METRICS_FILE = "metrics.jsonl"


class Metrics:
    def __init__(self, cfg: MetricsConfig, run_dir: str, *, resume_after_step: int | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.history: list[dict[str, Any]] = _truncate_after(self.path, resume_after_step)
        self.pending: dict[int, dict[str, Any]] = {}
        self.sources: dict[int, list[dict[str, Any]]] = {}
        self.law_points = [
            (r["entropy/mean"], r["eval/pass@1"])
            for r in self.history
            if "eval/pass@1" in r and "entropy/mean" in r
        ]
        self.change_pairs = [
            (r["entropy/predicted_change"], r["entropy/measured_change"])
            for r in self.history
            if "entropy/predicted_change" in r and "entropy/measured_change" in r
        ]
        first = next((r["entropy/mean"] for r in self.history if "entropy/mean" in r), None)
        self.initial_entropy: float | None = first
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.wandb = _start_wandb(cfg.wandb, self.run_dir) if cfg.wandb.enabled else None

    def info(self) -> dict[str, object]:
        return where("metrics", 0)

    def record(self, rec: MetricsRecord) -> None:
        merged = self.pending.setdefault(rec.step, {})
        for k, v in rec.metrics.items():
            merged[k] = float(v)
        self.sources.setdefault(rec.step, []).append(
            {"role": rec.role, "replica": rec.replica, "node_id": rec.node_id}
        )
        for name, rows in rec.tables.items():
            table_dir = self.run_dir / name
            table_dir.mkdir(exist_ok=True)
            with open(table_dir / f"step_{rec.step:06d}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")

    def flush_step(self, step: int) -> dict[str, Any]:
        """Finalise a step: derived metrics, alerts, one jsonl line, TensorBoard. Returns the line."""
        row: dict[str, Any] = {"step": step, "time": time.time()} | self.pending.pop(step, {})
        row["sources"] = self.sources.pop(step, [])
        warnings = self._derive(row)
        if warnings:
            row["warnings"] = warnings
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.history.append(row)
        scalars = {
            k: v
            for k, v in row.items()
            if isinstance(v, int | float) and k not in ("step", "time") and math.isfinite(v)
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        return row

    def _derive(self, row: dict[str, Any]) -> list[str]:
        from pipeline.core.law import fit_law

        warnings = []
        h = row.get("entropy/mean")
        if h is not None:
            if self.initial_entropy is None:
                self.initial_entropy = h
            h0 = self.initial_entropy
            row["entropy/relative"] = h / h0 if h0 else 1.0
            if h0 and h < self.cfg.collapse_fraction * h0:
                row["alert/entropy_collapse"] = 1.0
                warnings.append(
                    f"entropy collapse: {h:.4f} < {self.cfg.collapse_fraction:.0%} of initial {h0:.4f}"
                )
            if h0 and h > self.cfg.surge_factor * h0:
                row["alert/entropy_surge"] = 1.0
                warnings.append(f"entropy surge: {h:.4f} > {self.cfg.surge_factor}x initial {h0:.4f}")
        if "entropy/predicted_change" in row and "entropy/measured_change" in row:
            self.change_pairs.append((row["entropy/predicted_change"], row["entropy/measured_change"]))
            if len(self.change_pairs) >= 3:
                pred, meas = zip(*self.change_pairs)
                if np.std(pred) > 0 and np.std(meas) > 0:
                    row["entropy/change_correlation"] = float(np.corrcoef(pred, meas)[0, 1])
        if h is not None and "eval/pass@1" in row:
            self.law_points.append((h, row["eval/pass@1"]))
            if len(self.law_points) >= 3:
                try:
                    fit = fit_law([p[0] for p in self.law_points], [p[1] for p in self.law_points])
                    row |= {"law/a": fit.a, "law/b": fit.b, "law/r2": fit.r2, "law/ceiling": fit.ceiling}
                except ValueError:
                    pass
        return warnings

    def rows(self) -> list[dict[str, Any]]:
        return list(self.history)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            # finish() returns once the exit record is handed over, not once the run file is written;
            # the actor outlives it (Ray may kill it next), so wait for wandb's service to shut down.
            wandb.teardown()
            self.wandb = None


def check_wandb(cfg: WandbConfig) -> None:
    """Config-time check (before Ray starts): an enabled W&B sink needs the wandb package."""
    if not cfg.enabled:
        return
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"metrics.wandb.enabled: the wandb package cannot be imported ({err}); install the extra "
            "(pip install 'covrl[wandb]') or set metrics.wandb.enabled=false"
        ) from None


def _start_wandb(cfg: WandbConfig, run_dir: Path) -> Any:
    """One W&B run per metrics actor, its config the run's resolved config.yaml. A resumed or restarted
    run starts a new W&B run of the same name (W&B refuses steps below a run's last one)."""
    import wandb
    import yaml

    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    wandb_dir = Path(cfg.dir) if cfg.dir else run_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    # The actor's own stdout and the node's hardware are not the run's metrics: not captured or sampled.
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
    return wandb.init(
        project=cfg.project,
        name=cfg.name or run_dir.name,
        mode=cfg.mode,
        dir=str(wandb_dir),
        config=config,
        settings=settings,
    )


def _truncate_after(path: Path, step: int | None) -> list[dict[str, Any]]:
    """On resume, keep only lines for steps <= ``step`` (a crash may have logged steps past the
    checkpoint); rewrite the file atomically so no step is duplicated or lost."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if step is None:
        path.unlink()
        return []
    kept = [r for r in rows if r["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return kept
