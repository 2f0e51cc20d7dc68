"""pipeline.driver.resource_plan: what each role asks for, and whether a config fits a cluster.

Every paper preset must fit the cluster that deploy/cluster.yaml and deploy/rayjob.yaml describe; an
oversubscribed or unplaceable role is reported by name.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.driver.config_io import load_config
from pipeline.driver.resource_plan import (
    ClusterSpec,
    NodeSpec,
    check_satisfiable,
    format_plan,
    plan_resources,
)

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs" / "presets").glob("*.yaml"))
CLUSTER_YAML = ROOT / "deploy" / "cluster.yaml"
RAYJOB_YAML = ROOT / "deploy" / "rayjob.yaml"


@pytest.fixture(scope="module")
def launcher_cluster():
    return ClusterSpec.from_cluster_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def kuberay_cluster():
    return ClusterSpec.from_kuberay(RAYJOB_YAML)


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_fits_the_launcher_cluster(path, launcher_cluster):
    cfg = load_config(path)
    assert check_satisfiable(cfg, launcher_cluster) == []


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_fits_the_kuberay_cluster(path, kuberay_cluster):
    cfg = load_config(path)
    assert check_satisfiable(cfg, kuberay_cluster) == []


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_presets_carry_the_paper_settings(path):
    cfg = load_config(path)
    s, lr, loss = cfg.schedule, cfg.learner, cfg.algorithm.policy_loss
    assert (s.prompts_per_step, s.group_size, lr.mini_batches) == (256, 8, 8)
    assert s.prompts_per_step // lr.mini_batches == 32  # mini-batch of 32 prompts
    assert cfg.generator.temperature == 1.0 and loss.loss_agg_mode == "token-mean"
    assert cfg.algorithm.kl_coef == 0 and cfg.algorithm.entropy_coef == 0 and not cfg.use_reference
    assert (cfg.generator.max_new_tokens, cfg.data.max_prompt_tokens, lr.lr) == (8192, 2048, 1e-6)
    assert cfg.generator.tensor_parallel_size == 2 and cfg.generator.resources.num_gpus == 2
    assert lr.zero_stage == 3 and cfg.algorithm.dynamic_sampling.enabled
    ws = cfg.weight_sync  # weights go by NCCL broadcast, not ~15-64 GB through the object store per step
    assert (ws.method, ws.backend, ws.wire_dtype) == ("collective", "nccl", "bfloat16")
    assert cfg.warnings() == []
    big = "32b" in path.name
    if loss.name == "ppo":
        assert (loss.clip_ratio_low, loss.clip_ratio_high) == (0.2, 0.28)
    elif loss.name == "clip_cov":
        assert (loss.clip_cov_ratio, loss.clip_cov_lb, loss.clip_cov_ub) == (2e-4, 1.0, 5.0)
        assert (loss.clip_ratio_low, loss.clip_ratio_high) == (1.0, 1.0)
    else:
        assert loss.name == "kl_cov" and loss.kl_cov_beta == 1.0
        assert loss.kl_cov_ratio == (2e-4 if big else 2e-3)
    # 4 nodes x 8 GPUs in all
    gpus = cfg.generator.replicas * cfg.generator.resources.num_gpus + lr.ranks * lr.resources.num_gpus
    assert gpus == 32


def test_both_manifests_describe_the_same_cluster(launcher_cluster, kuberay_cluster):
    a, b = launcher_cluster.totals(), kuberay_cluster.totals()
    for key in ("GPU", "gen_node", "learn_node", "verify_node"):
        assert a[key] == b[key], key
    assert a["GPU"] == 32
    doc = yaml.safe_load(CLUSTER_YAML.read_text())
    assert doc["max_workers"] == sum(t.get("max_workers", 0) for t in doc["available_node_types"].values())


def test_rayjob_entrypoint_runs_a_preset():
    spec = yaml.safe_load(RAYJOB_YAML.read_text())["spec"]
    assert spec["entrypoint"].startswith("python -m pipeline.train --config configs/presets/")
    preset = spec["entrypoint"].split("--config ")[1].split()[0]
    assert (ROOT / preset).is_file()
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


def test_oversubscribed_role_is_named(launcher_cluster):
    preset = ROOT / "configs" / "presets" / "qwen2.5-7b-kl-cov.yaml"
    problems = check_satisfiable(load_config(preset, ["generator.replicas=10"]), launcher_cluster)
    assert len(problems) == 1 and problems[0].startswith("generator: 10 replicas"), problems
    assert "only 8 fit" in problems[0]
    problems = check_satisfiable(load_config(preset, ["learner.ranks=32"]), launcher_cluster)
    assert problems and problems[0].startswith("learner: 32 ranks"), problems


def test_missing_label_and_tensor_parallel_mismatch_are_named(launcher_cluster):
    preset = ROOT / "configs" / "presets" / "qwen2.5-32b-grpo.yaml"
    problems = check_satisfiable(
        load_config(preset, ["verifier.resources.custom={cpu_pool: 1}"]), launcher_cluster
    )
    assert problems and problems[0].startswith("verifier:") and "no node has cpu_pool" in problems[0]
    problems = check_satisfiable(load_config(preset, ["generator.resources.num_gpus=1"]), launcher_cluster)
    assert any(p.startswith("generator: tensor_parallel_size=2") for p in problems)


def test_plan_lists_one_bundle_per_actor_and_reference_only_when_used():
    cfg = load_config(None, ["generator.replicas=3", "verifier.replicas=2"])
    plan = {r.role: r for r in plan_resources(cfg)}
    assert set(plan) == {"learner", "generator", "verifier", "metrics"}
    assert len(plan["generator"].bundles) == 3 and len(plan["verifier"].bundles) == 2
    assert plan["learner"].gang and plan["generator"].bundles[0] == {"CPU": 1.0}
    cfg = load_config(None, ["algorithm.kl_coef=0.01", "reference.replicas=2"])
    plan = {r.role: r for r in plan_resources(cfg)}
    assert len(plan["reference"].bundles) == 2
    assert "reference" in format_plan(cfg)


def test_the_local_test_cluster_fits_the_pinned_small_job():
    # The shape tests/e2e/test_deploy.py starts with deploy/local-cluster.sh.
    cluster = ClusterSpec.from_nodes(
        [
            {"name": "head", "cpus": 2},
            {"name": "gen", "cpus": 1, "custom": {"gen_node": 1}},
            {"name": "learn", "cpus": 1, "custom": {"learn_node": 1}},
        ]
    )
    pins = ["generator.resources.custom={gen_node: 0.5}", "learner.resources.custom={learn_node: 0.5}"]
    assert check_satisfiable(load_config(None, pins), cluster) == []
    problems = check_satisfiable(load_config(None, [*pins, "learner.ranks=2"]), cluster)
    assert problems and problems[0].startswith("learner: 2 ranks")


def test_from_ray_nodes_reads_live_node_lists():
    nodes = [
        {"NodeID": "a" * 56, "Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9, "node:127.0.0.1": 1.0}},
        {"NodeID": "b" * 56, "Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0, "gen_node": 1.0}},
        {"NodeID": "c" * 56, "Alive": False, "Resources": {"CPU": 64.0}},
    ]
    spec = ClusterSpec.from_ray_nodes(nodes)
    assert spec.totals() == {"CPU": 3.0, "GPU": 1.0, "gen_node": 1.0}
    assert spec.nodes[1] == NodeSpec("b" * 12, 1.0, 1.0, {"gen_node": 1.0})


def test_resource_plan_is_pure():
    code = (
        "import json, sys\nimport pipeline.driver.resource_plan\n"
        "print(json.dumps([m for m in ('ray', 'vllm', 'deepspeed', 'torch') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
