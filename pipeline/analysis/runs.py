"""Loading run directories and the small numeric helpers every analysis uses (``covrl report``, the study).

Pure over ``metrics.jsonl`` rows: a missing or non-numeric metric is skipped, never an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.law import fit_law

MIN_LAW_POINTS = 3
MIN_CORR_POINTS = 3


class ReportError(ValueError):
    """Bad report input (a missing or unreadable metrics.jsonl, a --labels count mismatch)."""


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{lineno}: expected a JSON object per line")
        rows.append(row)
    rows.sort(key=lambda r: r["step"] if isinstance(r.get("step"), int | float) else math.inf)
    return rows


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}  # the config only names the run; a broken one must not stop the report
    return data if isinstance(data, dict) else {}


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"dir", "rows", "name", "method"}`` of one run directory; ReportError without metrics.jsonl."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    if not metrics.is_file():
        raise ReportError(
            f"{run_dir}: no metrics.jsonl there — not a covrl run directory (or no step finished yet)"
        )
    cfg = _read_config(run_dir / "config.yaml")
    policy_loss = (
        ((cfg.get("algorithm") or {}).get("policy_loss") or {})
        if isinstance(cfg.get("algorithm"), dict)
        else {}
    )
    method = policy_loss.get("name") if isinstance(policy_loss, dict) else None
    name = cfg.get("name") if isinstance(cfg.get("name"), str) else None
    return {"dir": run_dir, "rows": _read_rows(metrics), "name": name, "method": method}


def default_labels(runs: list[dict[str, Any]]) -> list[str]:
    labels = [r["name"] or r["method"] or r["dir"].name for r in runs]
    if len(set(labels)) < len(labels):  # same run name twice: tell them apart by method, then directory
        labels = [
            f"{lab} ({r['method']})" if r["method"] else lab for lab, r in zip(labels, runs, strict=True)
        ]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{r['dir'].name}]" for lab, r in zip(labels, runs, strict=True)]
    return labels


def as_float(x: Any) -> float | None:
    """A finite float, or None (missing, non-numeric, NaN, inf)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows where ``key`` is a finite number."""
    pts = [(r.get("step"), as_float(r.get(key))) for r in rows]
    pts = [(s, v) for s, v in pts if v is not None and as_float(s) is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts, strict=True)
    return np.asarray(steps, dtype=np.float64), np.asarray(vals, dtype=np.float64)


def paired(rows: list[dict[str, Any]], kx: str, ky: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) over the rows where both keys are finite numbers."""
    pts = [(as_float(r.get(kx)), as_float(r.get(ky))) for r in rows]
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts, strict=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r, or None with fewer than MIN_CORR_POINTS points or a constant side."""
    if x.size < MIN_CORR_POINTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return as_float(np.corrcoef(x, y)[0, 1])


def first_value(vals: np.ndarray) -> float | None:
    return float(vals[0]) if vals.size else None


def last_value(vals: np.ndarray) -> float | None:
    return float(vals[-1]) if vals.size else None


def mean_value(vals: np.ndarray) -> float | None:
    return float(vals.mean()) if vals.size else None


def fit_run_law(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Law fields of one run; all None with fewer than MIN_LAW_POINTS points or an unfittable set."""
    h, r = paired(rows, "entropy/mean", "eval/pass@1")
    out: dict[str, Any] = {"a": None, "b": None, "r2": None, "ceiling": None, "n": int(h.size)}
    if h.size < MIN_LAW_POINTS:
        return out
    try:
        fit = fit_law(h, r)
    except ValueError:  # e.g. constant entropy: a and b are not identifiable
        return out
    out.update(
        a=as_float(fit.a), b=as_float(fit.b), r2=as_float(fit.r2), ceiling=as_float(fit.ceiling), n=fit.n
    )
    return out


def pass_at_k_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The ``eval/pass@k`` keys logged in ``rows``, by k."""
    keys = {k for r in rows for k in r if k.startswith("eval/pass@") and k[len("eval/pass@") :].isdigit()}
    return sorted(keys, key=lambda k: int(k.rsplit("@", 1)[1]))
