"""Held-out evaluation: ``schedule.eval_samples`` samples per held-out prompt at ``eval_temperature``,
scored by the verifier pool; unbiased pass@k (``pipeline.core.pass_at_k``) for k in 1, 4, 16, 64 up to n."""

from __future__ import annotations

import time
from typing import Any

from pipeline.core.pass_at_k import pass_at_k_metrics
from pipeline.driver import generation
from pipeline.driver.roles import Roles
from pipeline.driver.rollout import encode_prompts
from pipeline.driver.verification import score_rollout
from schemas.run_config import ScheduleConfig


class Evaluator:
    def __init__(
        self, schedule: ScheduleConfig, roles: Roles, eval_rows: list[dict[str, Any]], tokenizer: Any
    ):
        self.schedule, self.roles, self.tokenizer = schedule, roles, tokenizer
        self.rows = eval_rows[: schedule.eval_prompts]

    def evaluate(self, step: int) -> dict[str, float]:
        sched = self.schedule
        prompts = encode_prompts(self.rows, self.tokenizer, step)
        t0 = time.perf_counter()
        rollout, _ = generation.generate(
            self.roles.generators,
            prompts,
            sched.eval_samples,
            temperature=sched.eval_temperature,
            report=False,
        )
        scored = score_rollout(self.roles.verifiers, rollout)
        correct = scored.rewards.reshape(len(self.rows), sched.eval_samples) >= 1.0
        return pass_at_k_metrics(correct) | {
            "eval/response_length": float(rollout.responses.lengths.mean()),
            "time/eval": time.perf_counter() - t0,
        }
