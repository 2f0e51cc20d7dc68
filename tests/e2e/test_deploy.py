"""Deployment: deploy/submit.sh and deploy/local-cluster.sh, for real.

The fast checks build the runtime_env of a checkout full of heavy files (a .venv, old runs, checkpoints,
weights) and measure what Ray would upload with Ray's own packager. The e2e check starts a head and two
worker "nodes" on this machine ({"gen_node": 1} and {"learn_node": 1}), submits a two-step training job
through submit.sh with the generator and the learner pinned to those nodes, and checks where they ran
and that `stop` leaves none of the started processes behind.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "deploy" / "submit.sh"
CLUSTER = ROOT / "deploy" / "local-cluster.sh"
PY = sys.executable


def run(cmd, timeout=120, env=None, check=True):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def test_scripts_parse():
    for script in (SUBMIT, CLUSTER):
        run(["bash", "-n", str(script)])
        assert "--state-dir" in run(["bash", str(script), "--help"]).stdout or script == SUBMIT
    assert "--no-wait" in run(["bash", str(SUBMIT), "--help"]).stdout


def _heavy_checkout(root: Path) -> Path:
    """A checkout-like tree with 60 MiB of things that must never be uploaded."""
    (root / "pipeline").mkdir(parents=True)
    (root / "pipeline" / "x.py").write_text("print('hi')\n")
    blob = os.urandom(10 * 2**20)
    for rel in (
        ".venv/lib/big.so",
        "runs/old-run/checkpoints/step_000010/learner/mp_rank_00.pt",
        "runs/old-run/metrics.jsonl",
        "checkpoints/model.bin",
        "weights/model.safetensors",
        ".cache/covrl/tiny.bin",
        "ignored_by_git/data.bin",
    ):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    (root / ".gitignore").write_text("ignored_by_git/\n")
    return root


def _dry_run(workdir: Path, *train_args: str, env_extra: dict | None = None) -> tuple[float, dict, str]:
    env = dict(os.environ) | (env_extra or {})
    out = run(["bash", str(SUBMIT), "--working-dir", str(workdir), "--dry-run", "--", *train_args], env=env)
    mib = float(re.search(r"upload: .* -> ([0-9.]+) MiB zipped", out.stdout).group(1))
    runtime_env = json.loads(re.search(r"^runtime_env: (.*)$", out.stdout, re.M).group(1))
    entry = re.search(r"^entrypoint: (.*)$", out.stdout, re.M).group(1)
    return mib, runtime_env, entry


def test_upload_stays_small_from_a_heavy_checkout(tmp_path):
    work = _heavy_checkout(tmp_path / "checkout")
    mib, runtime_env, entry = _dry_run(work, "--set", "schedule.steps=2", env_extra={"HF_HUB_OFFLINE": "1"})
    assert mib < 0.1, (
        mib
    )  # 70 MiB of .venv, runs, checkpoints, weights, caches, .gitignore'd data stay behind
    assert runtime_env["working_dir"] == str(work)
    for pattern in (".venv", "runs", ".git", ".cache", "__pycache__", "checkpoints", "*.safetensors"):
        assert pattern in runtime_env["excludes"]
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert runtime_env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert "--set ray.address=auto" in entry
    assert f"run_dir={ROOT}/runs/" in entry.replace("\\", "")
    assert entry.rstrip().endswith("--set schedule.steps=2")


def test_ray_respects_gitignore_by_default(tmp_path):
    # ignored_by_git/ is in no exclude list: only .gitignore keeps it out — unless Ray is told to ignore it.
    work = _heavy_checkout(tmp_path / "checkout")
    mib, _, _ = _dry_run(work, env_extra={"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"})
    assert mib > 9, mib


def test_run_dir_and_extras_are_respected(tmp_path):
    work = _heavy_checkout(tmp_path / "checkout")
    req = tmp_path / "req.txt"
    req.write_text("# my verifiers\nsympy>=1.12\nmy-verifiers==0.1\n")
    env = dict(os.environ) | {"MY_TOKENLESS_VAR": "v"}
    out = run(
        [
            "bash",
            str(SUBMIT),
            "--working-dir",
            str(work),
            "--dry-run",
            "--pip",
            str(req),
            "--py-module",
            str(work / "pipeline"),
            "--env",
            "MY_TOKENLESS_VAR",
            "--env",
            "OTHER=1",
            "--exclude",
            "*.log",
            "--",
            "--set",
            "run_dir=/shared/r/{name}",
        ],
        env=env,
    )
    runtime_env = json.loads(re.search(r"^runtime_env: (.*)$", out.stdout, re.M).group(1))
    entry = re.search(r"^entrypoint: (.*)$", out.stdout, re.M).group(1).replace("\\", "")
    assert runtime_env["pip"] == {"packages": ["sympy>=1.12", "my-verifiers==0.1"]}
    assert runtime_env["py_modules"] == [str(work / "pipeline")]
    assert runtime_env["env_vars"]["MY_TOKENLESS_VAR"] == "v" and runtime_env["env_vars"]["OTHER"] == "1"
    assert "*.log" in runtime_env["excludes"]
    assert entry.count("run_dir=") == 1 and "run_dir=/shared/r/{name}" in entry
    bad = run(["bash", str(SUBMIT), "--dry-run", "--bogus"], check=False)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def _tree_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


@pytest.mark.e2e
def test_submit_to_a_local_multi_node_cluster(tmp_path):
    from pipeline.data.tiny_model import ensure_tiny_model
    from pipeline.driver.config_io import load_config

    cfg = load_config(None)
    model = ensure_tiny_model(cfg.model.tiny, cfg.data.synthetic)  # cached; builds once on a fresh machine

    state = Path(tempfile.mkdtemp(prefix="covrl-lc-", dir="/tmp"))  # short: Ray's socket paths live under it
    common = ["--state-dir", str(state)]
    # Ports away from the defaults (and from a developer's own local-cluster.sh on 6390/8275).
    ports = ["--port", "6391", "--dashboard-port", "8276", "--port-base", "27900"]
    run_root = tmp_path / "runs"
    started_pids: list[int] = []
    t0 = time.perf_counter()
    try:
        run(
            [
                "bash",
                str(CLUSTER),
                "start",
                *common,
                *ports,
                "--workers",
                "2",
                "--worker-resources",
                '{"gen_node": 1}',
                "--worker-resources",
                '{"learn_node": 1}',
            ],
            timeout=300,
        )
        t_start = time.perf_counter() - t0
        started_pids = [int(p) for p in run(["bash", str(CLUSTER), "pids", *common]).stdout.split()]
        assert len(started_pids) >= 6  # 3 x (ray start, raylet, ...) at least

        status = run(["bash", str(CLUSTER), "status", *common, "--json"], timeout=120).stdout
        nodes = json.loads(status[status.index("[") :])
        assert len(nodes) == 3 and all(n["alive"] for n in nodes)
        by_label = {
            label: n["node_id"]
            for n in nodes
            for label in ("gen_node", "learn_node")
            if label in n["resources"]
        }
        assert set(by_label) == {"gen_node", "learn_node"} and by_label["gen_node"] != by_label["learn_node"]

        env = dict(os.environ) | {"HF_HUB_OFFLINE": "1"}
        for line in (state / "env").read_text().splitlines():  # RAY_ADDRESS, RAY_AUTH_MODE, token path
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = value
        small = {
            "model.path": str(model),
            "run_dir": f"{run_root}/{{name}}",
            "name": "deploy-e2e",
            "generator.resources.custom": "{gen_node: 0.5}",
            "learner.resources.custom": "{learn_node: 0.5}",
            "schedule.steps": 2,
            "schedule.prompts_per_step": 8,
            "schedule.group_size": 4,
            "schedule.eval_prompts": 16,
            "schedule.eval_samples": 2,
            "learner.mini_batches": 2,
            "metrics.tensorboard": "false",
        }
        args = [x for k, v in small.items() for x in ("--set", f"{k}={v}")]
        t1 = time.perf_counter()
        out = run(
            ["bash", str(SUBMIT), "--address", env["RAY_ADDRESS"], "--", *args],
            timeout=900,
            env=env,
            check=False,
        )
        t_job = time.perf_counter() - t1
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
        assert re.search(r"^submission_id: covrl-", out.stdout, re.M)
        assert "ray job logs -f" in out.stdout and "SUCCEEDED" in out.stdout

        run_dir = run_root / "deploy-e2e"
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        placement = {p["role"]: p for p in json.loads((run_dir / "placement.json").read_text())}
        assert placement["generator"]["node_id"] == by_label["gen_node"]
        assert placement["learner"]["node_id"] == by_label["learn_node"]
        # the metrics actor merged, into each step, records sent by roles on both worker nodes
        for row in rows:
            sent_from = {(s["role"], s["node_id"]) for s in row["sources"]}
            assert ("generator", by_label["gen_node"]) in sent_from
            assert ("learner", by_label["learn_node"]) in sent_from
        print(f"\n[deploy e2e] cluster start {t_start:.0f}s, job {t_job:.0f}s")
    finally:
        try:  # everything running now: raylets, job drivers, actors
            started_pids += [
                int(p) for p in run(["bash", str(CLUSTER), "pids", *common], check=False).stdout.split()
            ]
        except Exception:  # noqa: BLE001 - teardown must go on
            pass
        stop = run(["bash", str(CLUSTER), "stop", *common], timeout=180, check=False)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert _tree_alive(started_pids) == [], "processes the cluster started are still running"
    assert run(["bash", str(CLUSTER), "pids", *common]).stdout.strip() == ""
    shutil.rmtree(state, ignore_errors=True)  # kept (with the node logs) only when something failed
