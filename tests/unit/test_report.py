"""covrl report: figures and summary numbers of synthetic runs, checked against the raw metrics."""

import json
import math

import numpy as np
import pytest
import yaml

from pipeline.analysis.report import FIGURES, ReportError, build_report, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, *, name, method, a, b, steps=30, eval_every=5, h0=1.0, decay=0.08, seed=0, extra_rows=()):
    """A run whose entropy decays exponentially and whose eval pass@1 follows -a exp(H) + b + noise."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        h = h0 * math.exp(-decay * (step - 1)) + 0.05
        pred = float(rng.normal(-0.02, 0.01))
        row = {
            "step": step,
            "time": 1000.0 + step,
            "sources": [{"name": "synthetic"}],
            "entropy/mean": h,
            "entropy/p10": 0.5 * h,
            "entropy/p50": h,
            "entropy/p90": 1.5 * h,
            "entropy/predicted_change": pred,
            "cov/mean": float(rng.normal(0.001, 0.002)),
            "cov/p50": 1e-4 * step,
            "cov/p99": 1e-2,
            "cov/max": 0.5 + 0.01 * step,
            "cov/frac_positive": 0.55,
            "actor/cov/selected_frac": 0.002,
            "reward/mean": float(-a * math.exp(h) + b + rng.normal(0, 0.05)),
            "time/step": 2.0 + 0.1 * (step % 3),
            "time/generate": 1.0,
            "time/learner": 0.5,
            "time/verify": 0.1,
            "time/weight_sync": 0.05,
        }
        if step % 2 == 0:  # measured on some steps only, correlated with the prediction
            row["entropy/measured_change"] = 0.8 * pred + float(rng.normal(0, 0.003))
        if step == 1 or step % eval_every == 0:
            row["eval/pass@1"] = float(-a * math.exp(h) + b + rng.normal(0, 0.003))
        if step == 7:
            row["warnings"] = ["slow verifier"]
        rows.append(row)
    rows[-1]["final/pass@1"] = rows[-1]["eval/pass@1"] + 0.001
    rows.extend(extra_rows)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"name": name, "algorithm": {"policy_loss": {"name": method}}, "model": {"path": None}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return rows


def expected(rows):
    """The summary numbers, computed directly from the rows (independently of pipeline.analysis.report)."""
    ent = [r["entropy/mean"] for r in rows if "entropy/mean" in r]
    evals = [r["eval/pass@1"] for r in rows if "eval/pass@1" in r]
    pairs = [
        (r["entropy/predicted_change"], r["entropy/measured_change"])
        for r in rows
        if "entropy/predicted_change" in r and "entropy/measured_change" in r
    ]
    cov = [r["cov/mean"] for r in rows if "cov/mean" in r]
    pred, meas = np.array(pairs).T
    return {
        "entropy_start": ent[0],
        "entropy_end": ent[-1],
        "accuracy_start": evals[0],
        "accuracy_end": rows[-1]["final/pass@1"],
        "corr": float(np.corrcoef(pred, meas)[0, 1]),
        "frac_pos": sum(c > 0 for c in cov) / len(cov),
        "step_time": float(np.mean([r["time/step"] for r in rows])),
    }


def assert_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert w > 100 and h > 100


@pytest.fixture
def two_runs(tmp_path):
    rows_a = write_run(tmp_path / "run_ppo", name="baseline", method="ppo", a=0.25, b=0.95, seed=1)
    rows_b = write_run(
        tmp_path / "run_clip", name="clipcov", method="clip_cov", a=0.10, b=0.80, decay=0.03, seed=2
    )
    return tmp_path, rows_a, rows_b


def test_report_numbers_and_figures(two_runs):
    tmp, rows_a, rows_b = two_runs
    out = tmp / "report"
    result = build_report([tmp / "run_ppo", tmp / "run_clip"], out)

    for fig in FIGURES:
        assert_png(out / fig)
    md = (out / "summary.md").read_text()
    assert "## baseline" in md and "## clipcov" in md and "ppo" in md and "clip_cov" in md
    for fig in FIGURES:
        assert f"]({fig})" in md
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["runs"] == result["runs"]

    for summ, rows, (a, b), method in zip(
        result["runs"], (rows_a, rows_b), ((0.25, 0.95), (0.10, 0.80)), ("ppo", "clip_cov"), strict=True
    ):
        exp = expected(rows)
        assert summ["method"] == method
        assert summ["steps"] == 30
        assert summ["entropy_start"] == pytest.approx(exp["entropy_start"])
        assert summ["entropy_end"] == pytest.approx(exp["entropy_end"])
        assert summ["accuracy_start"] == pytest.approx(exp["accuracy_start"])
        assert summ["accuracy_end"] == pytest.approx(exp["accuracy_end"])
        assert summ["entropy_change_corr"] == pytest.approx(exp["corr"])
        assert summ["entropy_change_corr"] > 0.8  # the synthetic measurement tracks the prediction
        assert summ["entropy_change_points"] == 15
        assert summ["cov_frac_positive_steps"] == pytest.approx(exp["frac_pos"])
        assert summ["mean_step_time_s"] == pytest.approx(exp["step_time"])
        assert summ["warnings"] == 1
        law = summ["law"]
        assert law["n"] == 7  # step 1 and every 5th of 30
        assert law["a"] == pytest.approx(a, abs=0.02)
        assert law["b"] == pytest.approx(b, abs=0.03)
        assert law["ceiling"] == pytest.approx(b - a, abs=0.03)
        assert law["r2"] > 0.9


def test_labels_and_default_out(two_runs, capsys):
    tmp, *_ = two_runs
    out = tmp / "labelled"
    assert main([str(tmp / "run_ppo"), str(tmp / "run_clip"), "--out", str(out), "--labels", "A,B"]) == 0
    summ = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summ["runs"]] == ["A", "B"]
    printed = capsys.readouterr().out
    assert "summary.md" in printed
    # The extrapolated ceiling can exceed 1: printed next to pass@1 it must not read as an accuracy.
    run_lines = [line for line in printed.splitlines() if "pass@1" in line]
    assert len(run_lines) == 2 and all("b-a" in x and "not an accuracy" in x for x in run_lines)
    assert "ceiling" not in printed
    # one run, no --out: RUN_DIR/report
    assert main([str(tmp / "run_ppo")]) == 0
    assert (tmp / "run_ppo" / "report" / "summary.md").is_file()
    # label count mismatch
    assert main([str(tmp / "run_ppo"), str(tmp / "run_clip"), "--out", str(out), "--labels", "A"]) == 2
    assert "2 run directories" in capsys.readouterr().err


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    write_run(tmp_path / "good", name="good", method="ppo", a=0.2, b=0.9)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="empty.*metrics.jsonl"):
        build_report([tmp_path / "good", empty], tmp_path / "out")
    assert main([str(tmp_path / "good"), str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "metrics.jsonl" in err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no RUN_DIR at all: argparse usage error
        main([])
    assert e.value.code == 2


def test_missing_metrics_degrade_gracefully(tmp_path):
    """A run with only entropy (no eval, no covariance, no measured change) still gets a report."""
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    rows = [{"step": s, "time": 0.0, "sources": [], "entropy/mean": 1.0 / s} for s in range(1, 6)]
    rows[2]["eval/pass@1"] = 0.4
    rows[4]["eval/pass@1"] = 0.5  # only 2 eval points: no law
    rows[4]["entropy/mean"] = float("nan")  # json.dumps writes NaN, as a logger may
    (sparse / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # no config.yaml
    write_run(tmp_path / "full", name="full", method="kl_cov", a=0.2, b=0.9)

    result = build_report([sparse], tmp_path / "out_sparse")
    for fig in FIGURES:  # law / entropy_change / covariance have no data at all: still written
        assert_png(tmp_path / "out_sparse" / fig)
    s = result["runs"][0]
    assert s["label"] == "sparse" and s["method"] is None
    assert s["law"] == {"a": None, "b": None, "r2": None, "ceiling": None, "n": 1}  # NaN entropy row dropped
    assert s["entropy_change_corr"] is None and s["cov_frac_positive_steps"] is None
    assert s["mean_step_time_s"] is None
    assert s["entropy_start"] == 1.0 and s["entropy_end"] == pytest.approx(0.25)
    assert s["accuracy_start"] == 0.4 and s["accuracy_end"] == 0.5
    json.loads((tmp_path / "out_sparse" / "summary.json").read_text())  # strict JSON (no NaN)

    mixed = build_report([sparse, tmp_path / "full"], tmp_path / "out_mixed")
    assert mixed["runs"][1]["law"]["a"] is not None
    for fig in FIGURES:
        assert_png(tmp_path / "out_mixed" / fig)


def test_bad_json_line_is_named(tmp_path):
    run = tmp_path / "broken"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(ReportError, match="metrics.jsonl:2"):
        build_report([run], tmp_path / "out")
