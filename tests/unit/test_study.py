"""The study analysis (pipeline.analysis.study) on synthetic runs whose answers are known."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.analysis.study import aggregate, analyze, paired_differences, render_tables, run_numbers

A, B = 5.0, 6.0  # R = -A exp(H) + B, ceiling 1.0


def synthetic_rows(steps=60, h0=0.1, rate=0.04, eval_every=5, target=None, cov=0.05):
    rows = []
    for s in range(1, steps + 1):
        h = h0 * math.exp(-rate * (s - 1))
        row = {
            "step": s,
            "entropy/mean": h,
            "cov/mean": cov,
            "entropy/predicted_change": -0.01 * h,
            "entropy/measured_change": -0.01 * h + (0.001 if s % 2 else -0.001),
        }
        if s == 1 or s % eval_every == 1:
            row["eval/pass@1"] = -A * math.exp(h) + B
        if target is not None:
            row |= {"control/target": target, "control/value": 0.005 * s}
        rows.append(row)
    return rows


def test_run_numbers_recover_the_law_and_the_collapse_shares():
    rows = synthetic_rows()
    n = run_numbers(rows)
    assert n["law_a"] == pytest.approx(A, rel=1e-6) and n["law_b"] == pytest.approx(B, rel=1e-6)
    assert n["law_r2"] == pytest.approx(1.0) and n["law_ceiling"] == pytest.approx(1.0, abs=1e-6)
    assert n["early_ceiling"] == pytest.approx(1.0, abs=1e-6)  # exact law: the first half predicts it
    h_end = rows[-1]["entropy/mean"]
    assert n["early_pred_at_end"] == pytest.approx(-A * math.exp(h_end) + B, abs=1e-6)
    # exponential decay: share of the drop reached at step 20 = (1 - e^{-0.04*19}) / (1 - e^{-0.04*59})
    want = (1 - math.exp(-0.04 * 19)) / (1 - math.exp(-0.04 * 59))
    assert n["entropy_drop_early_share"] == pytest.approx(want, rel=1e-9)
    assert n["cov_positive_share"] == 1.0 and n["entropy_fell_share"] == pytest.approx(0.5)
    assert n["dh_corr"] is not None and n["dh_corr_ma"] > n["dh_corr"]  # averaging removes the +-noise
    assert "control_rel_error" not in n


def test_controller_tracking_error_is_measured_after_the_first_third():
    rows = synthetic_rows(rate=0.0, h0=0.08, target=0.1)  # entropy held 20% below target
    n = run_numbers(rows)
    assert n["control_rel_error"] == pytest.approx(0.2)
    assert (n["control_knob_min"], n["control_knob_max"]) == (pytest.approx(0.005), pytest.approx(0.3))


def test_paired_differences_match_seed_by_seed():
    per_run = {
        "grpo": {0: {"x": 1.0}, 1: {"x": 2.0}},
        "arm": {0: {"x": 1.5}, 1: {"x": 1.9}, 2: {"x": 9.0}},  # seed 2 has no baseline: ignored
    }
    d = paired_differences(per_run, "grpo", ("x",))["arm"]["x"]
    assert d["n"] == 2 and d["positive"] == 1
    assert d["mean"] == pytest.approx(0.2) and d["sd"] == pytest.approx(math.sqrt(2) * 0.3)


def test_aggregate_and_tables_name_every_arm():
    per_run = {
        "grpo": {0: run_numbers(synthetic_rows())},
        "kl_cov": {0: run_numbers(synthetic_rows(rate=0.02))},
    }
    agg = aggregate(per_run)
    assert agg["grpo"]["law_a"][0] == pytest.approx(A)
    text = render_tables(
        agg, paired_differences(per_run, "grpo", ("entropy_mean", "entropy_end", "accuracy_end")), "grpo"
    )
    assert (
        "| kl_cov |" in text and "Paired differences to grpo" in text and "n/a" not in text.split("Paired")[0]
    )


def test_analyze_writes_tables_figures_and_json(tmp_path):
    runs = {}
    for arm, rate in (("grpo", 0.04), ("kl_cov", 0.02)):
        runs[arm] = {}
        for seed in (0, 1):
            d = tmp_path / f"{arm}-seed{seed}"
            d.mkdir()
            (d / "metrics.jsonl").write_text(
                "\n".join(json.dumps(r) for r in synthetic_rows(rate=rate + 0.001 * seed))
            )
            runs[arm][seed] = d
    result = analyze(runs, tmp_path / "out")
    for f in ("study.md", "study.json", "study_entropy.png", "study_accuracy.png", "study_law.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0, f
    diff = result["paired_differences"]["kl_cov"]["entropy_mean"]
    assert diff["positive"] == 2 and diff["mean"] > 0  # slower decay keeps more entropy on both seeds


def probe_rows(lr_slopes, n=20, seed=0):
    """Rows with a probe every step: measured dH = slope * (-lr * cov) + small noise."""
    import random

    rng = random.Random(seed)
    rows = []
    for s in range(1, n + 1):
        cov = 0.01 + 0.002 * s
        row = {"step": s, "probe/cov_token": cov, "probe/cov_group": 2 * cov, "probe/cov_token_vanilla": -cov}
        for lr, slope in lr_slopes.items():
            row[f"probe/dH@lr{lr:g}"] = slope * (-lr * cov) + rng.gauss(0, 1e-7)
        rows.append(row)
    return rows


def test_probe_summary_recovers_the_slope_and_correlations(tmp_path):
    from pipeline.analysis.probe_analysis import plot_probes, probe_summary, render_probe_table

    runs = [probe_rows({0.001: 1.4, 0.1: 0.5}, seed=i) for i in range(2)]
    summary = probe_summary(runs)
    assert [s["lr"] for s in summary] == [0.001, 0.1]
    small, big = summary
    assert small["n"] == 40 and small["slope"] == pytest.approx(1.4, rel=1e-2)
    assert big["slope"] == pytest.approx(0.5, rel=1e-2)
    assert small["corr_token"] > 0.99 and small["corr_group"] > 0.99  # group form is 2x token here
    assert small["corr_vanilla"] < -0.99  # the vanilla form was built with the opposite sign
    assert small["sign_agreement"] == 1.0
    assert "| 0.001 | 40 |" in render_probe_table(summary)
    path = plot_probes({"grpo": runs}, tmp_path / "probe.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decomposition_finds_the_link_that_breaks():
    """Synthetic chain: measured = lr * linear (+ curvature at the large lr), linear unrelated to tabular,
    tabular = 3 x the vanilla-form prediction. The summary must put the break at parameter sharing."""
    import random

    from pipeline.analysis.probe_analysis import decomposition_summary, render_decomposition_table

    rng = random.Random(3)
    rows = []
    for _ in range(60):
        cov = rng.uniform(0.0, 0.02)
        lin, tab = -rng.uniform(0.01, 0.05), -3 * cov
        rows.append(
            {
                "probe/cov_token": cov,
                "probe/cov_group": cov,
                "probe/cov_token_vanilla": cov,
                "probe/dH_linear": lin,
                "probe/dH_tabular": tab,
                "probe/dH@lr0.001": 1e-3 * lin,
                "probe/dH@lr0.1": 0.1 * lin + rng.gauss(0, 2e-3),
            }
        )
    rows.append({"step": 61})  # a row without probes is skipped
    links = {x["link"]: x for x in decomposition_summary(rows)}
    assert links["measured dH/lr at lr 0.001 vs network first order"]["corr"] > 0.999
    assert links["measured dH/lr at lr 0.1 vs network first order"]["corr"] < 0.99
    assert abs(links["network first order vs lookup-table first order"]["corr"]) < 0.4
    vanilla = links["lookup-table first order vs −Cov(log π, π·A) batch"]
    assert vanilla["corr"] > 0.999 and vanilla["slope"] == pytest.approx(3.0) and vanilla["n"] == 60
    assert "| parameter sharing | 60 |" in render_decomposition_table(list(links.values()))
    assert decomposition_summary([{"probe/cov_token": 0.1}]) == []


def test_study_reports_pass_at_k_and_probes(tmp_path):
    runs = {}
    for arm, bonus in (("grpo", 0.0), ("kl_cov", 0.05)):
        for seed in (0, 1):
            rows = synthetic_rows(steps=20)
            for r in rows:
                if "eval/pass@1" in r:
                    r["eval/pass@4"] = r["eval/pass@1"] + 0.2 + bonus
            rows[-1]["final/pass@4"] = 0.7 + bonus
            for r, p in zip(rows, probe_rows({0.01: 1.0}, n=20, seed=seed)):
                r |= {k: v for k, v in p.items() if k != "step"}
            d = tmp_path / f"{arm}-seed{seed}"
            d.mkdir()
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs.setdefault(arm, {})[seed] = d
    res = analyze(runs, tmp_path / "out", baseline="grpo")
    md = (tmp_path / "out" / "study.md").read_text()
    assert "pass@4" in md and "SGD entropy probes" in md
    assert res["paired_differences"]["kl_cov"]["pass@4_end"]["mean"] == pytest.approx(0.05)
    assert res["probes"][0]["n"] == 80
    assert (tmp_path / "out" / "study_pass_at_k.png").is_file() and (
        tmp_path / "out" / "study_probe.png"
    ).is_file()
