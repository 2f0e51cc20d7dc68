"""The end-of-run summary: held-out accuracy and entropy before/after, and where the time went."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.law import law_at

TIME_KEYS = (
    "time/generate",
    "time/verify",
    "time/reference",
    "time/learner",
    "time/weight_sync",
    "time/eval",
    "time/step",
)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def summarize_run(run_dir: str | Path, *, wall_s: float | None = None) -> dict[str, Any]:
    rows = read_metrics(run_dir)
    if not rows:
        return {"run_dir": str(run_dir), "steps": 0}
    evals = [r for r in rows if "eval/pass@1" in r]
    last = rows[-1]
    law_row = next((r for r in reversed(rows) if "law/a" in r), {})
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": last["step"],
        "wall_s": wall_s,
        "accuracy_before": evals[0]["eval/pass@1"] if evals else None,
        "accuracy_after": last.get("final/pass@1", evals[-1]["eval/pass@1"] if evals else None),
        "entropy_before": rows[0].get("entropy/mean"),
        "entropy_after": last.get("entropy/after_update", last.get("entropy/mean")),
        "reward_first": rows[0].get("reward/mean"),
        "reward_last": last.get("reward/mean"),
        "law": _law(law_row),
        "entropy_change_correlation": last.get("entropy/change_correlation"),
        "mean_seconds": {
            k.split("/")[1]: mean_value(rows, k) for k in TIME_KEYS if any(k in r for r in rows)
        },
    }
    return out


def _law(row: dict[str, Any]) -> dict[str, Any]:
    """The last fit, with its value at that step's entropy (``fit_at_final_entropy``, accuracy scale)."""
    law = {k.split("/")[1]: row[k] for k in ("law/a", "law/b", "law/r2", "law/ceiling") if k in row}
    if law:
        law["entropy"] = row.get("entropy/mean")
        law["fit_at_final_entropy"] = law_at(row, row.get("entropy/mean"))
    return law


def mean_value(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else 0.0


def print_summary(s: dict[str, Any]) -> None:
    def f(x: Any, spec: str = ".3f") -> str:
        return "n/a" if x is None else format(x, spec)

    print("\n== covrl run summary ==")
    print(f"run dir            {s['run_dir']}")
    print(f"steps              {s['steps']}   wall {f(s.get('wall_s'), '.0f')} s")
    print(f"held-out pass@1    {f(s.get('accuracy_before'))} -> {f(s.get('accuracy_after'))}")
    print(f"token entropy      {f(s.get('entropy_before'), '.4f')} -> {f(s.get('entropy_after'), '.4f')}")
    if s.get("law"):
        law = s["law"]
        # b-a is the curve at H=0, outside the measured range: labelled so it is not read as an accuracy.
        print(
            f"law R=-a*exp(H)+b  a={f(law.get('a'))} b={f(law.get('b'))} R2={f(law.get('r2'))}  "
            f"R(H={f(law.get('entropy'), '.4f')}) {f(law.get('fit_at_final_entropy'))}  "
            f"b-a {f(law.get('ceiling'))} at H=0 (extrapolated, not an accuracy)"
        )
    if s.get("mean_seconds"):
        print("mean seconds/step  " + "  ".join(f"{k} {v:.2f}" for k, v in s["mean_seconds"].items()))
