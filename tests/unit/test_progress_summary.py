"""The live line and the end-of-run summary must not print the law's extrapolated ceiling as an accuracy."""

from __future__ import annotations

import io
import json
import math

from pipeline.analysis.summary import print_summary, summarize_run
from pipeline.driver.progress import Progress

# A fit like the default job's: -a + b = 1.101, above 1, so not an accuracy.
A, B, H = 5.76, 6.861, 0.05
FIT_AT_H = -A * math.exp(H) + B


def _row(step: int) -> dict:
    return {
        "step": step,
        "reward/mean": 0.5,
        "entropy/mean": H,
        "eval/pass@1": 0.6,
        "law/a": A,
        "law/b": B,
        "law/r2": 0.97,
        "law/ceiling": B - A,
        "time/step": 1.0,
    }


def test_live_line_prints_the_fit_at_the_current_entropy_not_the_ceiling():
    out = io.StringIO()
    Progress(total=10, stream=out).update(_row(3))
    line = out.getvalue()
    assert f"{B - A:.3f}" not in line and "ceiling" not in line
    assert f"law R(H) {FIT_AT_H:.3f}" in line


def test_summary_marks_the_ceiling_as_an_extrapolation(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(_row(s)) + "\n" for s in (1, 2)))
    summary = summarize_run(tmp_path)
    assert summary["law"]["fit_at_final_entropy"] == FIT_AT_H
    print_summary(summary)
    law_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("law"))
    assert f"R(H={H:.4f}) {FIT_AT_H:.3f}" in law_line
    assert f"b-a {B - A:.3f} at H=0 (extrapolated, not an accuracy)" in law_line
    assert f"ceiling={B - A:.3f}" not in law_line
