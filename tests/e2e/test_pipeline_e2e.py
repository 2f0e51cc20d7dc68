"""The real pipeline end to end on CPU: vLLM generators, verifier pool, DeepSpeed learner, metrics, Ray.

One short run of the embedded default (reduced sizes) is shared by several checks; resume continues
that run. The tiny model is built once into the covrl cache (the first run on a fresh machine pays
for the warm start).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.datasets import PromptStream, load_split
from pipeline.train import main as train_main
from schemas.run_config import RunConfig
from tests.helpers import assert_logprobs_agree

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

SMALL = {
    "schedule.prompts_per_step": 16,
    "schedule.group_size": 4,
    "schedule.eval_prompts": 32,
    "schedule.eval_samples": 2,
    "schedule.eval_every": 2,
    "schedule.checkpoint_every": 2,
    "learner.mini_batches": 2,
    "metrics.tensorboard": "false",
}


def sets(overrides: dict) -> list[str]:
    return [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("runs")
    rc = train_main(sets(SMALL | {"name": "e2e", "run_dir": f"{root}/{{name}}", "schedule.steps": 3}))
    assert rc == 0
    return root / "e2e"


def test_short_run_writes_a_complete_run_dir(short_run):
    r = rows(short_run)
    assert [x["step"] for x in r] == [1, 2, 3]
    for name in ("config.yaml", "summary.json", "placement.json"):
        assert (short_run / name).is_file(), name
    assert (short_run / "checkpoints" / "latest").read_text() == "step_000003"
    roles = {p["role"] for p in json.loads((short_run / "placement.json").read_text())}
    assert roles == {"generator", "verifier", "learner", "metrics"}  # no reference: kl_coef = 0
    first = r[0]
    # the warm-started tiny model solves some held-out problems at T=1, so generation + verification are real
    assert 0.05 < first["eval/pass@1"] < 0.95
    assert 0 < first["reward/mean"] < 1
    assert first["entropy/mean"] > 0 and np.isfinite(first["cov/mean"])
    assert "final/pass@1" in r[-1]
    summary = json.loads((short_run / "summary.json").read_text())
    assert summary["accuracy_before"] == first["eval/pass@1"]


def test_weight_sync_makes_vllm_and_learner_logprobs_agree(short_run):
    # Step 1 samples with the initial weights (both sides load the same files); steps 2 and 3 sample with
    # weights pushed learner -> vLLM after an update: the learner's recomputation must match vLLM's.
    r = rows(short_run)
    assert_logprobs_agree(r)
    assert [row["policy_version"] for row in r] == [1.0, 2.0, 3.0]
    assert all(row["version_lag"] == 0 for row in r)


def test_every_role_reports_with_its_node(short_run):
    srcs = {s["role"] for s in rows(short_run)[1]["sources"]}
    assert {"generator", "learner", "driver"} <= srcs


def test_resume_continues_with_the_same_data_order(short_run):
    assert train_main(["--resume", str(short_run), *sets({"schedule.steps": 5})]) == 0
    r = rows(short_run)
    assert [x["step"] for x in r] == [1, 2, 3, 4, 5]
    got = {}
    for f in sorted((short_run / "prompt_ids").iterdir()):
        rec = json.loads(f.read_text())
        got[rec["step"]] = rec["ids"]
    cfg = RunConfig.model_validate(__import__("yaml").safe_load((short_run / "config.yaml").read_text()))
    train_rows, _ = load_split(cfg.data, "train")
    stream = PromptStream.from_config(train_rows, cfg.data)
    index = {row["id"]: i for i, row in enumerate(train_rows)}
    for step in range(1, 6):
        want = [index[row["id"]] for row in stream.next_batch(cfg.schedule.prompts_per_step)]
        assert got[step] == want, f"step {step}: data order differs from an uninterrupted stream"


def test_custom_verifier_plugin_trains_on_a_jsonl_dataset(tmp_path, ray_cluster):
    """A user's verifier (examples/custom_verifier, selected by import path) scores a JSONL dataset end to end."""
    from pipeline.data.addition import make_prompt, make_response

    rng = np.random.default_rng(0)
    data_rows = []
    for i in range(64):
        a, b = (int(x) for x in rng.integers(100, 1000, size=2))
        data_rows.append(
            {
                "prompt": make_prompt(a, b),
                "ground_truth": make_response(a, b, 3),
                "data_source": "chains",
                "id": i,
            }
        )
    data = tmp_path / "chains.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in data_rows))
    overrides = SMALL | {
        "name": "custom",
        "run_dir": f"{tmp_path}/{{name}}",
        "schedule.steps": 2,
        "schedule.eval_every": 0,
        "data.train_files": f"[{data}]",
        "data.eval_files": f"[{data}]",
        "verifier.default": '{name: "examples.custom_verifier.my_verifier:MyVerifier", options: {bonus: 0.0}}',
    }
    assert train_main(sets(overrides)) == 0
    r = rows(tmp_path / "custom")
    assert [x["step"] for x in r] == [1, 2]
    # the warm-started model writes the full chain right for some prompts: the plug-in scores them 1
    assert 0 < r[0]["reward/mean"] < 1 and 0 < r[0]["eval/pass@1"] < 1
    assert r[0]["verifier/chains/count"] == 16 * 4


@pytest.mark.parametrize(
    "overrides, checks",
    [
        (  # three orthogonal recipe features in one run (each check reads only its own metrics):
            # - dynamic sampling: only informative groups are trained on, and the batch is refilled to size;
            # - the entropy controller sets Clip-Cov's ratio each step from the measured entropy: the target
            #   (1.5x the step-1 entropy) is above the entropy, so the knob stays above its start (2e-4);
            # - a KL term starts the reference role: frozen initial policy, per-token reference log-probs;
            #   after the first update the policy has moved away from it, so the KL to it is positive
            {
                "algorithm.dynamic_sampling": "{enabled: true, max_rounds: 3}",
                "algorithm.policy_loss.name": "clip_cov",
                "algorithm.entropy_control": "{enabled: true, target_fraction: 1.5}",
                "algorithm.kl_coef": 0.05,
            },
            {
                "dynamic sampling": lambda r: (
                    r["sampling/kept_groups"] <= 16
                    and "sampling/filtered_frac" in r
                    and r["reward/kept_mean"] > 0
                ),
                "entropy control": lambda r: (
                    r["control/value"] > 2e-4 and r["control/target"] > r["entropy/mean"]
                ),
                "kl reference": lambda r: (
                    r["time/reference"] > 0
                    and (r["step"] == 1 or r["actor/kl_ref"] > 1e-6)
                    and "reference" in {s["role"] for s in r["sources"]}
                ),
            },
        ),
        (  # one-step-async: generation of step t+1 runs with the weights of step t-1, and the learner
            # lends a core to the generator while it generates (actors/core_share.py)
            {"schedule.mode": "async", "generator.threads": 1, "learner.threads_while_generating": 1},
            {"one-step lag": lambda r: r["step"] == 1 or r["version_lag"] == 1},
        ),
    ],
    ids=["dynamic_sampling+entropy_control+kl_reference", "async"],
)
def test_recipe_modes_run_end_to_end(overrides, checks, tmp_path, ray_cluster):
    assert (
        train_main(
            sets(
                SMALL
                | {"run_dir": f"{tmp_path}/run", "schedule.steps": 3, "schedule.eval_every": 0}
                | overrides
            )
        )
        == 0
    )
    r = rows(tmp_path / "run")
    assert [x["step"] for x in r] == [1, 2, 3]
    for name, check in checks.items():
        failed = [x["step"] for x in r if not check(x)]
        assert not failed, (name, failed, r[-1])
    if "learner.threads_while_generating" in overrides:  # steps 1-2 overlap the next step's generation
        assert sum(x["time/learner_cores_lent"] for x in r[:-1]) > 0
