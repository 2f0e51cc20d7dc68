"""Scaling curves against TRL: covrl (sync, and async with core lending) and TRL's GRPOTrainer side by
side at each point, sweeping one axis at a time from the default point of bench_vs_trl.py:

    response length  48 -> 128 -> 512 -> 1024 tokens (every response exactly that long in both systems:
                     EOS masked until max_new_tokens, vLLM's min_tokens / HF's min_new_tokens)
    group size       8 -> 32
    model width      1.8M -> ~10M -> ~40M parameters

Every point uses random-weight models (bench/_models.py; same weights for both systems), the addition
prompts, 4 updates per rollout batch, fp32 in both (`--bf16` for bf16), and runs each system in its own
subprocess (clean Ray, clean peak RSS), the three interleaved. Reported per point: samples/s and response
tokens/s over the steady steps (the first step is warm-up; covrl async's last step has nothing to overlap
and is dropped too, so every system is timed on the same steps), the covrl/TRL ratio (median step time,
and min), the per-role split of a step, and peak RSS per role. Writes the markdown table bench/README.md
carries, bench/results/scaling_vs_trl.json (raw numbers) and bench/results/scaling_vs_trl.png (the ratio
against each axis).

TRL is set up as in bench_vs_trl.py (its packages beside the venv, on PYTHONPATH):
    PYTHONPATH=.cache/trl-pkgs .venv/bin/python bench/bench_scaling.py [--quick] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_vs_trl import BF16, COVRL_MODES, GROUP, MAX_NEW  # noqa: E402

# The default point is bench_vs_trl.py's job (48 tokens, groups of 8, the 1.8M model) at 8 prompts
# instead of 32, and every longer point keeps a step at ~8k response tokens, so that the sweep fits its
# time on 2 shared cores; both systems get the same prompts at every point. The group axis keeps the
# samples per step (64) and moves only how they are grouped; the width axis runs 2 prompts, as the 40M
# model's update costs ~22x the tiny one's.
DEFAULT = {"max_new": MAX_NEW, "group": GROUP, "size": "tiny", "prompts": 8}
WIDTH = DEFAULT | {"prompts": 2}
AXES: dict[str, list[dict]] = {
    "response length": [
        DEFAULT,
        DEFAULT | {"max_new": 128},
        DEFAULT | {"max_new": 512, "prompts": 2},
        DEFAULT | {"max_new": 1024, "prompts": 1},
    ],
    "group size": [DEFAULT, DEFAULT | {"group": 32, "prompts": 2}],
    "model width": [WIDTH, WIDTH | {"size": "10m"}, WIDTH | {"size": "40m"}],
}
# run order: the generation-bound end of the length axis and the widest model first, so a sweep cut off
# has the points where the ratio could fall
LENGTH, GROUPS = AXES["response length"], AXES["group size"]
ORDER = [
    LENGTH[0],
    LENGTH[3],
    AXES["model width"][2],
    GROUPS[1],
    LENGTH[2],
    LENGTH[1],
    *AXES["model width"][:2],
]
SYSTEMS = ["covrl sync", "covrl async", "TRL"]
RESULTS = ROOT / "bench" / "results"


def point_key(p: dict) -> str:
    return f"{p['size']}-T{p['max_new']}-G{p['group']}-P{p['prompts']}"


def model_dir(size: str) -> str:
    from bench._models import build_random_model

    # positions for the longest point (1024 new tokens + the prompt); the weights are seeded, so a rebuilt
    # directory holds the same model
    cache = Path(os.environ.get("COVRL_CACHE") or Path.home() / ".cache" / "covrl") / "bench-models"
    return str(build_random_model(size, cache / f"{size}-pos1088", max_positions=1088))


# -- one system at one point, in its own process ------------------------------------------------------


def covrl_steps(rows: list[dict], samples: int, mode: str) -> list[dict]:
    """Per-step split from covrl's own metrics. 'other' is the step minus the roles' own time: the
    driver's work and Ray in sync mode; in async mode generation overlaps the learner, so 'other' is the
    step minus learner, verify and sync, i.e. the part of generation the overlap did not hide (plus the
    driver)."""
    out, cpu_before = [], {}
    for r in rows:
        # the roles' CPU seconds in this step (generator and learner: the verifier, metrics actor and driver
        # use little), from each role's cumulative process CPU time
        cpu = 0.0
        for role in ("generator", "learner"):
            now = r.get(f"{role}/0/cpu_s")
            if now is not None:
                cpu += now - cpu_before.get(role, now)
                cpu_before[role] = now
        step = {
            "wall": r["time/step"],
            "generate": r["time/generate"],
            "verify": r.get("time/verify", 0.0),
            "learner": r["time/learner"],
            "sync": r["time/weight_sync"],
            "tokens": r["response_length/mean"] * samples,
            "cpu": cpu,
        }
        hidden = 0.0 if mode == "sync" else step["generate"]
        step["other"] = (
            step["wall"] - step["verify"] - step["learner"] - step["sync"] - step["generate"] + hidden
        )
        out.append(step)
    return out


def worker(system: str, point: dict, steps: int, bf16: bool, out_json: Path, sets: list[str]) -> None:
    samples = point["prompts"] * point["group"]
    kw = dict(prompts=point["prompts"], group=point["group"], max_new=point["max_new"], fixed_length=True)
    kw["evaluate"] = False
    run_dir = Path(tempfile.mkdtemp(prefix="covrl-scaling-"))
    model = model_dir(point["size"])
    if system == "TRL":
        from bench.bench_vs_trl import run_trl

        r = run_trl(steps, model, run_dir, bf16, **kw)
        per_step = [s | {"sync": 0.0, "other": 0.0, "tokens": point["max_new"] * samples} for s in r["steps"]]
        rss = {"all roles (one process)": _peak_rss_mb()}
    else:
        from bench.bench_vs_trl import run_covrl

        mode = system.split()[1]
        extra = COVRL_MODES[mode] + (BF16 if bf16 else []) + sets
        r = run_covrl(steps, run_dir / "run", extra, model_path=model, **kw)
        per_step = covrl_steps(r["rows"], samples, mode)
        last = r["rows"][-1]
        rss = {
            role: max(row.get(f"{role}/0/rss_peak_mb", 0.0) for row in r["rows"])
            for role in ("generator", "learner")
        }
        rss["driver"] = _peak_rss_mb()
        assert abs(last["response_length/mean"] - point["max_new"]) < 1e-6, "responses are not fixed-length"
    out_json.write_text(json.dumps({"system": system, "point": point, "steps": per_step, "rss_mb": rss}))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the sweep ----------------------------------------------------------------------------------------


def run_one(system: str, point: dict, steps: int, bf16: bool, log: Path) -> dict | None:
    """``system``: 'TRL', 'covrl MODE', or 'covrl MODE [KEY=VALUE ...]' (extra covrl overrides, --ab)."""
    out = Path(tempfile.mkstemp(prefix="covrl-scaling-", suffix=".json")[1])
    name, _, sets = system.partition(" [")
    cmd = [sys.executable, __file__, "--worker", name, "--point", json.dumps(point), "--steps", str(steps)]
    cmd += [x for kv in sets.rstrip("]").split() for x in ("--set", kv)]
    cmd += ["--out", str(out)] + (["--bf16"] if bf16 else [])
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n=== {system} {point_key(point)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"  {system:12} {point_key(point):22} rc={rc} {time.perf_counter() - t0:6.1f} s", flush=True)
    return json.loads(out.read_text()) if rc == 0 else None


def summarize(run: dict) -> dict:
    """Steady steps only: drop the first (warm-up) and, for every system alike, the last (covrl async's
    last step has no next generation to overlap)."""
    steady = run["steps"][1:-1] or run["steps"][1:]
    walls = [s["wall"] for s in steady]
    samples = run["point"]["prompts"] * run["point"]["group"]
    med = statistics.median(walls)
    split = {
        k: statistics.median(s[k] for s in steady) for k in ("generate", "verify", "learner", "sync", "other")
    }
    return {
        "step_s_median": med,
        "step_s_min": min(walls),
        "samples_per_s": samples / med,
        "tokens_per_s": statistics.median(s["tokens"] for s in steady) / med,
        "split_s": split,
        "rss_mb": run["rss_mb"],
        "steady_steps": len(steady),
        "cpu_s_median": statistics.median(s.get("cpu", float("nan")) for s in steady),
    }


def sweep(
    points: list[dict], steps: int, repeats: int, bf16: bool, log: Path, save, systems=SYSTEMS, results=None
) -> dict:
    results = {} if results is None else results
    for p in points:
        key = point_key(p)
        if key in results:
            continue
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for rep in range(repeats):
            # rotate the order per repeat so no system always runs first after a model build
            k = rep % len(systems)
            order = systems[k:] + systems[:k]
            for system in order:
                r = run_one(system, p, steps, bf16, log)
                if r is not None:
                    runs[system].append(summarize(r))
        results[key] = {"point": p, "runs": runs}
        save(results)  # after every point: a sweep cut off keeps what it measured
    return results


def ratios(entry: dict, system: str) -> dict | None:
    """covrl / TRL samples/s at a point: median over repeats of the median step, and best vs best."""
    mine, trl = entry["runs"].get(system), entry["runs"].get("TRL")
    if not mine or not trl:
        return None
    med = statistics.median(r["step_s_median"] for r in trl) / statistics.median(
        r["step_s_median"] for r in mine
    )
    best = min(r["step_s_min"] for r in trl) / min(r["step_s_min"] for r in mine)
    # CPU seconds per step: what each system's work costs whatever else the machine runs meanwhile
    cpu = [statistics.median(r.get("cpu_s_median", float("nan")) for r in x) for x in (trl, mine)]
    return {"median": med, "min": best, "cpu": cpu[0] / cpu[1] if cpu[1] == cpu[1] and cpu[1] > 0 else None}


def predicted_own_devices(entry: dict) -> float | None:
    """covrl/TRL samples/s predicted for a node where generation has its own device: one-step-async then
    costs max(generate, learner + sync + verify) per step, each from covrl sync's measured split (roles
    measured alone, not overlapped), against TRL's measured step, which generates and learns in turn on
    one device whatever the node."""
    mine, trl = entry["runs"].get("covrl sync"), entry["runs"].get("TRL")
    if not mine or not trl:
        return None
    sp = min(mine, key=lambda r: r["step_s_median"])["split_s"]
    own = max(sp["generate"], sp["learner"] + sp["sync"] + sp["verify"])
    return statistics.median(r["step_s_median"] for r in trl) / own


def table(results: dict) -> str:
    head = (
        "| axis | point | system | samples/s | tokens/s | vs TRL (median / best / CPU-s) | generate / verify / learner / sync / other s "
        "| peak RSS MB (per role) | vs TRL, generation on its own device (predicted) |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for axis, pts in AXES.items():
        for p in pts:
            entry = results.get(point_key(p))
            if entry is None:
                continue
            label = {"response length": f"{p['max_new']} tok", "group size": f"G={p['group']}"}.get(
                axis, {"tiny": "1.8M", "10m": "10.6M", "40m": "39.7M"}[p["size"]]
            )
            label += f" ({p['prompts']}x{p['group']})"
            for system in SYSTEMS:
                runs = entry["runs"].get(system) or []
                if not runs:
                    continue
                s = min(runs, key=lambda r: r["step_s_median"])
                sp = s["split_s"]
                ratio = ratios(entry, system) if system != "TRL" else None
                rs = f"{ratio['median']:.2f} / {ratio['min']:.2f}" if ratio else "1"
                if ratio and ratio["cpu"] is not None:
                    rs += f" / CPU {ratio['cpu']:.2f}"
                mem = ", ".join(f"{k} {v:.0f}" for k, v in s["rss_mb"].items())
                split = " / ".join(f"{sp[k]:.2f}" for k in ("generate", "verify", "learner", "sync", "other"))
                pred = predicted_own_devices(entry) if system == "covrl async" else None
                lines.append(
                    f"| {axis} | {label} | {system} | {s['samples_per_s']:.2f} | {s['tokens_per_s']:.0f} | {rs} "
                    f"| {split} | {mem} | {'' if pred is None else f'{pred:.2f}'} |"
                )
    return "\n".join(lines)


def plot(results: dict, path: Path, repeats: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 3.6), sharey=True)
    xs = {"response length": "max_new", "group size": "group", "model width": "size"}
    sizes = {"tiny": 1.8, "10m": 10.6, "40m": 39.7}
    for ax, (axis, pts) in zip(axes, AXES.items()):
        measured = False
        for system, marker in (("covrl sync", "o"), ("covrl async", "s")):
            x, y = [], []
            for p in pts:
                entry = results.get(point_key(p))
                r = ratios(entry, system) if entry else None
                if r:
                    v = p[xs[axis]]
                    x.append(sizes[v] if axis == "model width" else v)
                    y.append(r["median"])
            ax.plot(x, y, marker=marker, label=system)
            for xi, yi in zip(x, y):
                ax.annotate(f"{yi:.2f}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
            measured = measured or bool(x)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(2.0, color="grey", lw=0.8, ls="--")
        if axis != "group size" and measured:
            ax.set_xscale("log")
        if measured:  # ticks at the measured points only: log axes' minor labels overlap at these spans
            ax.set_xticks(sorted(set(x)), [f"{v:g}" for v in sorted(set(x))])
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
        ax.set_xlabel({"model width": "parameters (M)", "response length": "response tokens"}.get(axis, axis))
        ax.set_title(axis)
    axes[0].set_ylabel("covrl / TRL samples/s (wall)")
    runs = "one run" if repeats == 1 else f"{repeats} runs"
    fig.suptitle(f"covrl / TRL, wall time (median steady step), {runs} per system and point", fontsize=9)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--steps", type=int, default=4, help="RL steps per run (the first and last are not timed)"
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs of each system per point (min/median over them)"
    )
    ap.add_argument("--quick", action="store_true", help="the default point and the longest length, 3 steps")
    ap.add_argument("--only", help="comma-separated point keys (e.g. tiny-T1024-G8-P4)")
    ap.add_argument("--bf16", action="store_true", help="both systems in bf16 (default fp32)")
    ap.add_argument("--out", help="results JSON (default bench/results/scaling_vs_trl[_quick].json)")
    ap.add_argument("--keep", action="store_true", help="keep the points already in --out; measure the rest")
    ap.add_argument("--from-json", help="print the table and plot of an earlier sweep's JSON, run nothing")
    ap.add_argument(
        "--ab",
        help="before/after of a fix instead of the sweep: covrl sync with and without these space-separated "
        "overrides (KEY=VALUE), interleaved, at --only points (default: the default point)",
    )
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--point", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.point), args.steps, args.bf16, Path(args.out), args.set)
        return
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()), Path(args.from_json))
        return
    points = ORDER
    if args.quick:
        points, args.steps = [DEFAULT, AXES["response length"][-1]], 3
    if args.only or args.ab:
        keys = (args.only or point_key(DEFAULT)).split(",")
        points = [p for p in {point_key(p): p for p in ORDER}.values() if point_key(p) in keys]
    if args.ab:
        return ab(points, args)
    for size in sorted({p["size"] for p in points}):
        model_dir(size)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "scaling_vs_trl" + ("_quick" if args.quick or args.only else "")
    out = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    log = out.with_suffix(".log")
    print(
        f"{len(points)} points x {len(SYSTEMS)} systems x {args.repeats} repeats, {args.steps} steps; log {log}"
    )
    t0 = time.perf_counter()
    meta = {"steps": args.steps, "repeats": args.repeats, "precision": "bf16" if args.bf16 else "fp32"}

    def save(results: dict) -> None:
        meta["sweep_s"] = time.perf_counter() - t0
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    kept = json.loads(out.read_text())["results"] if args.keep and out.exists() else None
    results = sweep(points, args.steps, args.repeats, args.bf16, log, save, results=kept)
    report({"meta": meta, "results": results}, out)


def ab(points: list[dict], args) -> None:
    """A fix measured side by side: covrl sync without the overrides (the code as it is) and with them
    (a fix's flag turned off, or on), interleaved run by run."""
    systems = ["covrl sync", f"covrl sync [{args.ab}]"]
    log = RESULTS / "ab.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = sweep(points, args.steps, args.repeats, args.bf16, log, lambda r: None, systems)
    print(f"\nbefore: covrl sync; after: + {args.ab} ({args.repeats} runs each, steady steps)")
    print(
        f"{'point':22} {'before s/step':>14} {'after s/step':>13} {'gain (median)':>14} {'gain (min)':>11}  split before"
    )
    for key, entry in results.items():
        before, after = entry["runs"][systems[0]], entry["runs"][systems[1]]
        if not before or not after:
            continue
        b = [r["step_s_median"] for r in before]
        a = [r["step_s_median"] for r in after]
        split = " / ".join(f"{k} {v:.2f}" for k, v in before[0]["split_s"].items())
        print(
            f"{key:22} {statistics.median(b):9.2f} {statistics.median(a):9.2f} "
            f"{statistics.median(a) / statistics.median(b):13.2f} {min(a) / min(b):10.2f}  {split}"
        )


def report(data: dict, out: Path) -> None:
    print(f"\n{table(data['results'])}\n\nsweep {data['meta']['sweep_s'] / 60:.1f} min; raw numbers: {out}")
    plot(data["results"], out.with_suffix(".png"), data["meta"].get("repeats", 1))
    print(f"plot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
