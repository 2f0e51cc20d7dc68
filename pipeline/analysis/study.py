"""The reproduction study's analysis: per-run claim numbers, per-arm aggregates over seeds, paired
arm-vs-baseline differences, the markdown tables and per-arm figures (mean over seeds with a min-max band).

Pure over ``metrics.jsonl`` rows (``pipeline.analysis.report`` loads them); ``bench/run_study.py`` trains the arms
and calls :func:`analyze`. Each number maps to one of the paper's four claims (docs/results.md):

1. collapse: entropy start/end, the share of the entropy drop and of the accuracy gain reached in the
   first third of the steps;
2. the law: full fit (a, b, R^2, ceiling) and the ceiling predicted from the first half of the eval
   points, against the final accuracy;
3. dH vs covariance: per-step and 10-step-moving-average correlation of predicted (-eta Cov) and measured
   entropy change, share of steps with positive covariance and with falling entropy;
4. interventions: paired (same seed = same data order and init) differences to the baseline arm in mean
   entropy, final entropy and final accuracy; controller tracking error.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.analysis.probe_analysis import (
    decomposition_summary,
    plot_probes,
    probe_summary,
    render_decomposition_table,
    render_probe_table,
)
from pipeline.analysis.runs import as_float, fit_run_law, load_run, paired, pass_at_k_keys, pearson, series
from pipeline.analysis.study_figures import plot_study
from pipeline.core.law import fit_law

EARLY_FRACTION = 1 / 3  # "early" for claim 1
LAW_EARLY_FRACTION = 0.5  # eval points used to predict the ceiling (claim 2)
MIN_EARLY_LAW_POINTS = 3
MA_WINDOW = 10
PASS_K_DIFFS = ("pass@4_end", "pass@16_end", "pass@64_end")
# table and figure order of a study's arms: the baseline, the peer method, the paper's methods, the rest
ARM_ORDER = ("grpo", "clip_higher", "clip_cov", "kl_cov", "entropy_bonus", "controller", "controller_clip")


def arm_sort_key(arm: str) -> int:
    """Position of ``arm`` in ``ARM_ORDER`` (arms not listed go last)."""
    return ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)


def runs_in(root: Path) -> dict[str, dict[int, Path]]:
    """``{arm: {seed: run_dir}}`` of the ``<arm>-seed<N>`` directories under ``root``, arms in table order."""
    found: dict[str, dict[int, Path]] = {}
    for d in sorted(p for p in Path(root).iterdir() if p.is_dir() and "-seed" in p.name):
        arm, seed = d.name.rsplit("-seed", 1)
        found.setdefault(arm, {})[int(seed)] = d
    return {arm: found[arm] for arm in sorted(found, key=arm_sort_key)}


def _moving_average(x: np.ndarray, w: int) -> np.ndarray:
    return np.convolve(x, np.ones(w) / w, mode="valid") if x.size >= w else np.zeros(0)


def _value_at(steps: np.ndarray, vals: np.ndarray, step: float) -> float | None:
    """The series linearly interpolated at ``step`` (evaluations are logged every few steps)."""
    if not steps.size or step < steps[0]:
        return None
    return float(np.interp(step, steps, vals))


def _frac(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or abs(den) < 1e-12:
        return None
    return num / den


def early_law(rows: list[dict[str, Any]], fraction: float = LAW_EARLY_FRACTION) -> dict[str, Any]:
    """Fit R = -a exp(H) + b on the first ``fraction`` of the eval points and return its ceiling."""
    h, r = paired(rows, "entropy/mean", "eval/pass@1")
    n = max(MIN_EARLY_LAW_POINTS, int(round(fraction * h.size)))
    out: dict[str, Any] = {"a": None, "b": None, "ceiling": None, "n": int(min(n, h.size))}
    if h.size < n:
        return out
    try:
        fit = fit_law(h[:n], r[:n])
    except ValueError:
        return out
    return out | {"a": as_float(fit.a), "b": as_float(fit.b), "ceiling": as_float(fit.ceiling)}


def run_numbers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-run claim numbers (None where the run logged too little)."""
    steps, ent = series(rows, "entropy/mean")
    ev_steps, ev = series(rows, "eval/pass@1")
    _, final = series(rows, "final/pass@1")
    _, ent_after = series(rows, "entropy/after_update")
    total = float(steps.max()) if steps.size else 0.0
    early_step = EARLY_FRACTION * total
    h0 = float(ent[0]) if ent.size else None
    h_end = float(ent_after[-1]) if ent_after.size else (float(ent[-1]) if ent.size else None)
    acc0 = float(ev[0]) if ev.size else None
    acc_end = float(final[-1]) if final.size else (float(ev[-1]) if ev.size else None)
    h_early = _value_at(steps, ent, early_step)
    acc_early = _value_at(ev_steps, ev, early_step)

    law = fit_run_law(rows)  # the same fit `covrl report` shows
    early = early_law(rows)

    pred, meas = paired(rows, "entropy/predicted_change", "entropy/measured_change")
    _, cov = series(rows, "cov/mean")
    out = {
        "steps": int(total),
        "entropy_start": h0,
        "entropy_end": h_end,
        "entropy_mean": float(ent.mean()) if ent.size else None,
        "entropy_drop_early_share": _frac(
            None if h0 is None or h_early is None else h0 - h_early,
            None if h0 is None or h_end is None else h0 - h_end,
        ),
        "accuracy_start": acc0,
        "accuracy_end": acc_end,
        "accuracy_gain_early_share": _frac(
            None if acc0 is None or acc_early is None else acc_early - acc0,
            None if acc0 is None or acc_end is None else acc_end - acc0,
        ),
        "law_a": law["a"],
        "law_b": law["b"],
        "law_r2": law["r2"],
        "law_ceiling": law["ceiling"],
        "law_points": law["n"],
        "early_ceiling": early["ceiling"],
        "early_points": early["n"],
        "early_ceiling_error": None
        if early["ceiling"] is None or acc_end is None
        else early["ceiling"] - acc_end,
        # the early fit's prediction at the entropy the run ended with (the budget stops before H = 0)
        "early_pred_at_end": None
        if early["a"] is None or h_end is None
        else -early["a"] * float(np.exp(h_end)) + early["b"],
        "dh_corr": pearson(pred, meas),
        "dh_corr_ma": pearson(_moving_average(pred, MA_WINDOW), _moving_average(meas, MA_WINDOW)),
        "cov_positive_share": float((cov > 0).mean()) if cov.size else None,
        "entropy_fell_share": float((meas < 0).mean()) if meas.size else None,
    }
    for key in pass_at_k_keys(rows):
        k = key.rsplit("@", 1)[1]
        _, start = series(rows, key)
        _, end = series(rows, f"final/pass@{k}")
        out[f"pass@{k}_start"] = float(start[0]) if start.size else None
        out[f"pass@{k}_end"] = float(end[-1]) if end.size else (float(start[-1]) if start.size else None)
    t_steps, target = series(rows, "control/target")
    _, knob = series(rows, "control/value")
    if target.size:
        by_step = {int(s): v for s, v in zip(steps, ent, strict=True)}
        # control/target at step t is the target the step-t entropy was compared with
        errs = [
            abs(by_step[int(s)] / t - 1)
            for s, t in zip(t_steps, target, strict=True)
            if int(s) in by_step and s >= early_step
        ]
        out |= {
            "control_rel_error": float(np.mean(errs)) if errs else None,
            "control_target": float(target[-1]),
            "control_knob_min": float(knob.min()) if knob.size else None,
            "control_knob_max": float(knob.max()) if knob.size else None,
        }
    return out


def _ms(vals: list[float | None]) -> tuple[float | None, float | None, int]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None, 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def aggregate(per_run: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{arm: {seed: run_numbers}}`` -> ``{arm: {metric: (mean, sd, n)}}``."""
    out: dict[str, dict[str, Any]] = {}
    for arm, by_seed in per_run.items():
        keys = sorted({k for nums in by_seed.values() for k in nums})
        out[arm] = {k: _ms([nums.get(k) for nums in by_seed.values()]) for k in keys}
    return out


def paired_differences(
    per_run: dict[str, dict[int, dict[str, Any]]], baseline: str, keys: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Per arm: mean/sd over seeds of (arm - baseline) for the same seed, and how many seeds were > 0."""
    base = per_run.get(baseline, {})
    out: dict[str, dict[str, Any]] = {}
    for arm, by_seed in per_run.items():
        if arm == baseline:
            continue
        row = {}
        for k in keys:
            diffs = [
                by_seed[s][k] - base[s][k]
                for s in sorted(by_seed)
                if s in base and by_seed[s].get(k) is not None and base[s].get(k) is not None
            ]
            mean, sd, n = _ms(diffs)
            row[k] = {"mean": mean, "sd": sd, "n": n, "positive": sum(d > 0 for d in diffs)}
        out[arm] = row
    return out


# ----------------------------------------------------------------------------------------- tables


def _fmt(m: tuple[float | None, float | None, int], spec: str = ".3f") -> str:
    mean, sd, _ = m
    if mean is None:
        return "n/a"
    return format(mean, spec) + ("" if sd is None else f" ± {format(sd, spec.replace('+', ''))}")


def _has(diffs: dict[str, dict[str, Any]], key: str) -> bool:
    return any(row.get(key, {}).get("n") for row in diffs.values())


def render_tables(agg: dict[str, dict[str, Any]], diffs: dict[str, dict[str, Any]], baseline: str) -> str:
    arms = list(agg)
    n = {a: max((v[2] for v in agg[a].values()), default=0) for a in arms}
    lines = [
        "Mean ± sd over seeds.",
        "",
        "**Entropy and accuracy (claims 1, 4)**",
        "",
        "| arm | seeds | entropy start | entropy end | mean entropy | drop by 1/3 of steps | pass@1 start | pass@1 end | gain by 1/3 of steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        g = agg[a]
        lines.append(
            f"| {a} | {n[a]} | {_fmt(g['entropy_start'], '.4f')} | {_fmt(g['entropy_end'], '.4f')} | "
            f"{_fmt(g['entropy_mean'], '.4f')} | {_fmt(g['entropy_drop_early_share'], '.0%')} | "
            f"{_fmt(g['accuracy_start'])} | {_fmt(g['accuracy_end'])} | {_fmt(g['accuracy_gain_early_share'], '.0%')} |"
        )
    ks = sorted(
        {int(k[5:-6]) for g in agg.values() for k in g if k.startswith("pass@") and k.endswith("_start")}
    )
    if ks:
        lines += [
            "",
            "**Held-out pass@k, start → end (unbiased estimator; exploration kept or lost)**",
            "",
            "| arm | " + " | ".join(f"pass@{k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for a in arms:
            g = agg[a]
            cells = [
                f"{_fmt(g.get(f'pass@{k}_start', (None, None, 0)))} → {_fmt(g.get(f'pass@{k}_end', (None, None, 0)))}"
                for k in ks
            ]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**The law R = -a·exp(H) + b (claim 2)**",
        "",
        "| arm | a | b | R² | ceiling −a+b (all points) | ceiling from first half | first-half fit at final H | final pass@1 | early ceiling − final |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        g = agg[a]
        lines.append(
            f"| {a} | {_fmt(g['law_a'], '.2f')} | {_fmt(g['law_b'], '.2f')} | {_fmt(g['law_r2'], '.2f')} | "
            f"{_fmt(g['law_ceiling'])} | {_fmt(g['early_ceiling'])} | {_fmt(g['early_pred_at_end'])} | "
            f"{_fmt(g['accuracy_end'])} | "
            f"{_fmt(g['early_ceiling_error'], '+.3f')} |"
        )
    lines += [
        "",
        "**Entropy change vs covariance (claim 3)**",
        "",
        f"| arm | corr(pred, meas dH) per step | corr, {MA_WINDOW}-step moving average | steps with cov > 0 | steps where entropy fell |",
        "|---|---|---|---|---|",
    ]
    for a in arms:
        g = agg[a]
        lines.append(
            f"| {a} | {_fmt(g['dh_corr'], '.2f')} | {_fmt(g['dh_corr_ma'], '.2f')} | "
            f"{_fmt(g['cov_positive_share'], '.0%')} | {_fmt(g['entropy_fell_share'], '.0%')} |"
        )
    if diffs:
        lines += [
            "",
            f"**Paired differences to {baseline} (same seed: same data order and initial weights; claim 4)**",
            "",
            "| arm | Δ mean entropy | seeds > 0 | Δ final entropy | seeds > 0 | Δ final pass@1 | seeds > 0 | "
            + " | ".join(
                f"Δ final {k.removesuffix('_end')} | seeds > 0" for k in PASS_K_DIFFS if _has(diffs, k)
            )
            + " |",
            "|---|---|---|---|---|---|---|" + "---|---|" * sum(_has(diffs, k) for k in PASS_K_DIFFS),
        ]
        for a, row in diffs.items():
            cells = []
            pass_keys = tuple((k, "+.3f") for k in PASS_K_DIFFS if _has(diffs, k))
            for k, spec in (
                ("entropy_mean", "+.4f"),
                ("entropy_end", "+.4f"),
                ("accuracy_end", "+.3f"),
                *pass_keys,
            ):
                d = row[k]
                cells += [_fmt((d["mean"], d["sd"], d["n"]), spec), f"{d['positive']}/{d['n']}"]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    ctrl = [a for a in arms if agg[a].get("control_rel_error", (None,))[0] is not None]
    if ctrl:
        lines += [
            "",
            "**Entropy controller (issue: target-entropy control)**",
            "",
            "| arm | target (nats) | mean abs(H/target − 1) after the first third | knob min | knob max |",
            "|---|---|---|---|---|",
        ]
        for a in ctrl:
            g = agg[a]
            lines.append(
                f"| {a} | {_fmt(g['control_target'], '.4f')} | {_fmt(g['control_rel_error'], '.1%')} | "
                f"{_fmt(g['control_knob_min'], '.2g')} | {_fmt(g['control_knob_max'], '.2g')} |"
            )
    return "\n".join(lines) + "\n"


def analyze(runs: dict[str, dict[int, Path]], out: Path, baseline: str = "grpo") -> dict[str, Any]:
    """``{arm: {seed: run_dir}}`` -> study.md (tables), study.json and the per-arm figures in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = {arm: {seed: load_run(d)["rows"] for seed, d in by_seed.items()} for arm, by_seed in runs.items()}
    per_run = {arm: {seed: run_numbers(r) for seed, r in by_seed.items()} for arm, by_seed in rows.items()}
    agg = aggregate(per_run)
    keys = ("entropy_mean", "entropy_end", "accuracy_end", *PASS_K_DIFFS)
    diffs = paired_differences(per_run, baseline, keys) if baseline in per_run else {}
    arm_rows = {arm: list(by_seed.values()) for arm, by_seed in rows.items()}
    figures = plot_study(arm_rows, out)
    probes = probe_summary([r for runs in arm_rows.values() for r in runs])
    text = render_tables(agg, diffs, baseline)
    if probes:
        figures.append(plot_probes(arm_rows, out / "study_probe.png"))
        text += (
            "\n**SGD entropy probes, all arms and seeds pooled (claim 3 in the first-order regime)**\n\n"
            + render_probe_table(probes)
        )
    links = decomposition_summary([row for runs in arm_rows.values() for r in runs for row in r])
    if links:
        text += (
            "\n**From the measured change to the law, one link at a time (per unit lr, probes pooled)**\n\n"
            + render_decomposition_table(links)
        )
    (out / "study.md").write_text(text)
    result = {
        "per_run": per_run,
        "aggregate": agg,
        "paired_differences": diffs,
        "probes": probes,
        "probe_decomposition": links,
        "figures": [str(p) for p in figures],
    }
    (out / "study.json").write_text(json.dumps(result, indent=1, default=str))
    return result
