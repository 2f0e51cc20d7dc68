"""Fault injection into real short runs (vLLM, DeepSpeed, Ray): each test kills or breaks one thing and
asserts what covrl does. The table in docs/reliability.md points here."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import ray

from pipeline.data.datasets import PromptStream, load_split
from pipeline.data.tiny_model import ensure_tiny_model
from pipeline.driver import generation
from pipeline.driver.roles import start_roles, stop_roles
from pipeline.driver.rollout import encode_prompts
from pipeline.driver.weight_sync import WeightSync
from pipeline.train import parse_args, prepare
from schemas.run_config import RunConfig

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "schedule.prompts_per_step=16",
    "schedule.group_size=4",
    "schedule.eval_prompts=16",
    "schedule.eval_samples=2",
    "schedule.eval_every=0",
    "learner.mini_batches=2",
    "metrics.tensorboard=false",
]


def sets(items):
    return [x for kv in items for x in ("--set", kv)]


def rows(run_dir: Path):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_prompt_ids(run_dir: Path, steps: int) -> list[list[int]]:
    """What an uninterrupted run draws: the seeded stream, step after step."""
    import yaml

    cfg = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    train_rows, _ = load_split(cfg.data, "train")
    index = {r["id"]: i for i, r in enumerate(train_rows)}
    stream = PromptStream.from_config(train_rows, cfg.data)
    return [[index[r["id"]] for r in stream.next_batch(cfg.schedule.prompts_per_step)] for _ in range(steps)]


def logged_prompt_ids(run_dir: Path) -> list[list[int]]:
    files = sorted((run_dir / "prompt_ids").iterdir())
    return [json.loads(f.read_text())["ids"] for f in files]


def start_training(run_dir: Path, extra: list[str], env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.train", *sets(SMALL + [f"run_dir={run_dir}", *extra])]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=None if env is None else os.environ | env,
    )


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in rows(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def model_path():
    cfg = RunConfig()
    return str(ensure_tiny_model(cfg.model.tiny, cfg.data.synthetic))


@pytest.mark.parametrize("weight_sync", ["object_store", "collective"])
def test_generator_replica_killed_mid_step_loses_no_prompt(ray_cluster, model_path, tmp_path, weight_sync):
    args = parse_args(
        sets(
            SMALL
            + [
                f"model.path={model_path}",
                "generator.replicas=2",
                "generator.resources.num_cpus=0.5",
                f"weight_sync.method={weight_sync}",
                "weight_sync.timeout_s=20",  # bounds how long a peer of a failed round waits
                f"run_dir={tmp_path}/run",
            ]
        )
    )
    prep = prepare(args)
    roles = start_roles(prep.cfg, prep.model_path, str(tmp_path / "run"), resume_after_step=None)
    try:
        sync = WeightSync(prep.cfg, roles)
        sync.sync(0)  # collective: the transfer group now holds both replicas
        prompts = encode_prompts(prep.stream.next_batch(16), prep.tokenizer, 1)
        launched = generation.launch(roles.generators, prompts, 4)
        ray.kill(roles.generators[1], no_restart=False)  # dies mid-generation; Ray restarts it
        rollout, stats = generation.gather(roles.generators, launched)
        # every prompt exactly once, in order, with all of its samples
        assert rollout.prompts.prompt_ids.tolist() == prompts.prompt_ids.tolist()
        assert len(rollout) == 16 * 4
        assert stats["generator/failures"] == 1 and stats["generator/live_replicas"] == 1
        # the restarted replica comes back with the current weights and is used again
        deadline = time.time() + 120
        while not roles.generators.revive(timeout_s=5) and time.time() < deadline:
            time.sleep(1)
        assert roles.generators.live() == [0, 1]
        # collective: the restarted process is not in the old group; the failed broadcast rebuilds it
        sync.sync(7)
        versions = ray.get([g.info.remote() for g in roles.generators])
        assert [v["policy_version"] for v in versions] == [7, 7]
        rollout2, stats2 = generation.generate(roles.generators, prompts, 2)
        assert len(rollout2) == 32 and stats2["generator/live_replicas"] == 2
    finally:
        stop_roles(roles)


def learner_pid(run_dir: Path) -> int:
    return next(
        p["pid"] for p in json.loads((run_dir / "placement.json").read_text()) if p["role"] == "learner"
    )


def kill_the_learner(model_path: str, run_dir: Path) -> str:
    """A 4-step run whose learner is SIGKILLed after step 2; returns the run's output (it must exit 0)."""
    proc = start_training(
        run_dir, [f"model.path={model_path}", "schedule.steps=4", "schedule.checkpoint_every=1"]
    )
    try:
        wait_for_step(run_dir, 2, proc)
        os.kill(learner_pid(run_dir), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    return out


#: Raylet stall of the driver scenario, under health checks every 0.5 s with a 0.5 s timeout: Ray's default
#: threshold (5 failed checks) declares the run's only node dead within it (the run then fails: tried),
#: covrl's (``LOCAL_HEALTH_CHECK_FAILURES``) waits it out.
RAYLET_STALL_S = 15
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500"}


def kill_the_driver_then_resume(model_path: str, run_dir: Path) -> None:
    """A 4-step run whose raylet is stopped for ``RAYLET_STALL_S`` after step 1 (a machine too loaded to
    schedule it), and whose driver (with its whole session) is SIGKILLed past step 3, then ``--resume``."""
    proc = start_training(
        run_dir,
        [f"model.path={model_path}", "schedule.steps=4", "schedule.checkpoint_every=2"],
        env=FAST_HEALTH_CHECKS,
    )
    try:
        wait_for_step(run_dir, 1, proc)
        (raylet,) = [c.pid for c in psutil.Process(proc.pid).children() if c.name() == "raylet"]
        os.kill(raylet, signal.SIGSTOP)
        time.sleep(RAYLET_STALL_S)
        os.kill(raylet, signal.SIGCONT)
        try:
            wait_for_step(run_dir, 3, proc)  # a checkpoint at 2, step 3 logged past it
        except AssertionError as e:
            raise AssertionError(f"the run did not outlive a {RAYLET_STALL_S} s raylet stall: {e}") from None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # the state a kill mid-checkpoint leaves: a half-written step dir that must be ignored
    (run_dir / "checkpoints" / "step_000004.partial").mkdir(exist_ok=True)
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--resume", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]


@pytest.fixture(scope="module")
def killed_runs(model_path, tmp_path_factory):
    """Both kill scenarios at once, each its own training process (and local Ray) with one thread per
    role: a run alternates between generating and learning, so one alone leaves a core idle. Each test
    reads its own scenario's outcome (``.result()`` raises that scenario's failure only)."""
    root = tmp_path_factory.mktemp("killed")
    with ThreadPoolExecutor(2) as pool:  # leaving the block waits for both
        runs = {
            "learner": (root / "learner", pool.submit(kill_the_learner, model_path, root / "learner")),
            "driver": (
                root / "driver",
                pool.submit(kill_the_driver_then_resume, model_path, root / "driver"),
            ),
        }
    return runs


def test_learner_killed_restarts_from_checkpoint(killed_runs):
    run_dir, outcome = killed_runs["learner"]
    assert "restarting every role from checkpoint" in outcome.result()
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4]
    assert logged_prompt_ids(run_dir) == expected_prompt_ids(run_dir, 4)


def test_driver_sigkill_then_resume_has_no_gap_or_duplicate(killed_runs):
    run_dir, outcome = killed_runs["driver"]
    outcome.result()
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4]
    assert logged_prompt_ids(run_dir) == expected_prompt_ids(run_dir, 4)
    assert not (run_dir / "checkpoints" / "step_000004.partial").exists()


@pytest.mark.parametrize(
    "case",
    [
        "yaml",
        "unknown_key",
        "out_of_range",
        "missing_model",
        "tokenizer_mismatch",
        "empty_dataset",
        "malformed_rows",
    ],
)
def test_bad_input_exits_nonzero_with_a_clear_message_and_no_actor(case, tmp_path, model_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    args, needle = [], ""
    if case == "yaml":
        (tmp_path / "c.yaml").write_text("schedule: {steps: [1\n")
        args, needle = ["--config", str(tmp_path / "c.yaml")], "not valid YAML"
    elif case == "unknown_key":
        args, needle = sets(["generator.temprature=0.7"]), "generator.temprature: unknown key"
    elif case == "out_of_range":
        args, needle = (
            sets(["generator.top_p=1.5"]),
            "generator.top_p: Input should be less than or equal to 1",
        )
    elif case == "missing_model":
        args, needle = sets([f"model.path={tmp_path}/no-model"]), "no such directory"
    elif case == "tokenizer_mismatch":
        AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp_path / "m")
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=1,
                num_key_value_heads=1,
            )
        ).save_pretrained(tmp_path / "m")
        args, needle = sets([f"model.path={tmp_path}/m"]), "tokenizer/model mismatch"
    elif case == "empty_dataset":
        (tmp_path / "d.jsonl").write_text("")
        args, needle = (
            sets([f"model.path={model_path}", f"data.train_files=[{tmp_path}/d.jsonl]"]),
            "no usable prompts",
        )
    elif case == "malformed_rows":
        (tmp_path / "d.jsonl").write_text(
            '{"prompt": "1+1=", "ground_truth": "2"}\n{"prompt": 5, "ground_truth": "2"}\n'
        )
        args, needle = sets([f"model.path={model_path}", f"data.train_files=[{tmp_path}/d.jsonl]"]), "row 2"
    code = (
        "import sys, ray; from pipeline.train import main; rc = main(sys.argv[1:]); "
        "sys.exit(rc + (100 if ray.is_initialized() else 0))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert needle in res.stderr, res.stderr[-2000:]


def test_nothing_of_a_run_is_left_behind(ray_cluster, model_path, tmp_path):
    """A role that crashes while starting (here: vLLM rejects an engine argument, after the metrics actor,
    learner placement group, learners and verifiers exist) -> RoleStartError naming it, and every actor
    and placement group of the run is gone (Ray's state API) when the error is raised."""
    from ray.util.state import list_actors, list_placement_groups

    from pipeline.driver.roles import RoleStartError
    from tests.helpers import state_address

    before_pgs = {
        p.placement_group_id for p in list_placement_groups(address=state_address()) if p.state != "REMOVED"
    }
    args = parse_args(
        sets(
            SMALL
            + [
                f"model.path={model_path}",
                "generator.engine_kwargs={no_such_engine_arg: 1}",
                f"run_dir={tmp_path}/run",
            ]
        )
    )
    prep = prepare(args)
    with pytest.raises(RoleStartError, match="generator: failed to start"):
        start_roles(prep.cfg, prep.model_path, str(tmp_path / "run"), resume_after_step=None, timeout_s=120)
    # start_roles returned after stop_roles: every actor must be dead now, not eventually
    roles = ("Generator", "Learner", "Metrics", "VerifierWorker", "Reference")
    alive = [a for a in list_actors(address=state_address()) if a.state == "ALIVE" and a.class_name in roles]
    assert not alive, alive
    pgs = {
        p.placement_group_id for p in list_placement_groups(address=state_address()) if p.state != "REMOVED"
    }
    assert pgs <= before_pgs


def test_unsatisfiable_resources_fail_fast_naming_the_role(ray_cluster, model_path, tmp_path):
    from pipeline.driver.roles import RoleStartError

    args = parse_args(
        sets(SMALL + [f"model.path={model_path}", "learner.resources.custom={no_such_node: 1}"])
    )
    prep = prepare(args)
    t0 = time.time()
    with pytest.raises(RoleStartError, match="learner"):
        start_roles(prep.cfg, prep.model_path, str(tmp_path / "run"), resume_after_step=None)
    assert time.time() - t0 < 30, "must not wait for the start-up timeout"
