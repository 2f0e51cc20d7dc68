"""The countdown task through the real pipeline: one switch selects it, the tiny model bootstraps for it
(cached per task; the first run on a fresh machine pays for the warm start), its rows reach the countdown
verifier without a route in the config, and the rewards the learner saw are that verifier's."""

import json

import pytest
import yaml

from pipeline.data import countdown
from pipeline.train import main as train_main
from schemas.data_config import CountdownTaskConfig

pytestmark = [pytest.mark.e2e, pytest.mark.ray]

PROMPTS, GROUP = 16, 4


def test_countdown_runs_end_to_end_and_is_scored_by_its_verifier(tmp_path, ray_cluster):
    overrides = {
        "name": "countdown",
        "run_dir": f"{tmp_path}/{{name}}",
        "data.synthetic.task": "countdown",
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
    train_rows = countdown.make_rows(CountdownTaskConfig(), "train")
    ids = json.loads((run / "prompt_ids" / "step_000001.jsonl").read_text().splitlines()[0])["ids"]
    inspected = [json.loads(x) for x in (run / "inspector" / "step_000001.jsonl").read_text().splitlines()]
    assert inspected
    for tok in inspected:
        truth = train_rows[ids[int(tok["row"]) // GROUP]]["ground_truth"]
        assert countdown.score_response(tok["response"], truth)[0] == tok["reward"], (tok["response"], truth)
