"""The driver's step loop, and nothing heavy.

One synchronous step, as data flows (docs/architecture.md):
    prompts -> generators (vLLM) -> verifiers -> advantages -> [reference] -> learner ranks (DeepSpeed)
            -> weights to generators (versioned) -> metrics
The driver moves object references between roles; large arrays go through the object store once
(``ray.put`` of the TrainBatch; the weights go learner -> generators without passing here). Evaluation,
weight-sync membership and checkpoints are their own small classes (``evaluation``, ``weight_sync``,
``checkpoint``); each role is a ``RoleGroup`` (``roles``).
Deviations from textbook GRPO: none by default (token-mean, no KL, no entropy bonus, group-normalised
advantages, PPO epochs x mini-batches over each rollout batch).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from pipeline.core.advantages import advantages_from_config
from pipeline.core.batching import build_train_batch
from pipeline.core.entropy_control import EntropyController
from pipeline.core.recipe import fill_informative, handle_overlong, reward_metrics
from pipeline.data.verifiers.base import merge_stats
from pipeline.driver import generation
from pipeline.driver.checkpoint import Checkpointer, DriverState
from pipeline.driver.evaluation import Evaluator
from pipeline.driver.generation import Launched
from pipeline.driver.inspector import inspect_tokens
from pipeline.driver.progress import Progress
from pipeline.driver.roles import Roles
from pipeline.driver.rollout import DataSource, encode_prompts
from pipeline.driver.verification import score_rollout
from pipeline.driver.weight_sync import WeightSync
from schemas.batches import MetricsRecord, ScoredBatch
from schemas.run_config import RunConfig


def make_controller(cfg: RunConfig) -> EntropyController | None:
    """The target-entropy controller of ``algorithm.entropy_control`` (None when disabled)."""
    ec, loss = cfg.algorithm.entropy_control, cfg.algorithm.policy_loss
    if not ec.enabled:
        return None
    field = ec.knob_field(loss.name)
    return EntropyController(
        ec, loss.name, getattr(loss, field), mini_batches=cfg.learner.mini_batches, epochs=cfg.learner.epochs
    )


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps without a finite update."""


def track_bad_steps(
    bad_steps: int, learner_metrics: dict[str, float], *, step: int, limit: int, run_dir: str
) -> int:
    """Consecutive steps whose every update was skipped (non-finite loss/gradients); raises at ``limit``.
    No checkpoint is written by a failing step, so the last good one stays the latest."""
    skipped = learner_metrics.get("actor/skipped_updates", 0.0)
    bad_steps = bad_steps + 1 if skipped and skipped == learner_metrics.get("actor/updates") else 0
    if bad_steps >= limit:
        raise TrainingDiverged(
            f"{bad_steps} consecutive steps had every update skipped for non-finite loss/gradients (step {step}); "
            f"stopping. The last good checkpoint is kept: resume with --resume {run_dir} after lowering "
            "learner.lr or checking the data"
        )
    return bad_steps


def _every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str,
        roles: Roles,
        data: DataSource,
        *,
        start_step: int = 0,
        version: int = 0,
    ) -> None:
        self.cfg, self.run_dir, self.roles, self.data = cfg, run_dir, roles, data
        self.start_step, self.version = start_step, version
        self.progress = Progress(total=cfg.schedule.steps, start=start_step)
        self.weights = WeightSync(cfg, roles)
        self.evaluator = Evaluator(cfg.schedule, roles, data.eval_rows, data.tokenizer)
        self.checkpointer = Checkpointer(run_dir, roles.learners, keep=cfg.schedule.keep_checkpoints)
        self.controller = make_controller(cfg)
        self.bad_steps = 0
        self._pending: Launched | None = None  # async mode: the next step's generation, in flight
        self._data_state: dict[str, Any] = data.stream.state_dict()

    def _sample(self, n_prompts: int, step: int) -> tuple[ScoredBatch, dict[str, float]]:
        prompts = encode_prompts(self.data.stream.next_batch(n_prompts), self.data.tokenizer, step)
        rollout, gen_stats = generation.generate(self.roles.generators, prompts, self.cfg.schedule.group_size)
        return score_rollout(self.roles.verifiers, rollout), gen_stats

    def collect(self, step: int) -> tuple[ScoredBatch, dict[str, float], list[int], dict[str, float]]:
        """Scored rollouts to train on, generation stats, every prompt id drawn and sampling metrics:
        one round, or dynamic sampling (``algorithm.dynamic_sampling``, pipeline.core.recipe.fill_informative)."""
        cfg, sched = self.cfg, self.cfg.schedule
        if self._pending is not None:  # one-step-async: generation was launched during the last step
            rollout, gen_stats = generation.gather(self.roles.generators, self._pending)
            self._pending = None
            scored = score_rollout(self.roles.verifiers, rollout)
            return scored, gen_stats, scored.rollout.prompts.prompt_ids.tolist(), {}
        if not cfg.algorithm.dynamic_sampling.enabled:
            scored, gen_stats = self._sample(sched.prompts_per_step, step)
            return scored, gen_stats, scored.rollout.prompts.prompt_ids.tolist(), {}
        gen_parts: list[dict[str, float]] = []
        verify_parts: list[dict[str, float]] = []

        def sample(k: int) -> ScoredBatch:
            scored, gen_stats = self._sample(k, step)
            gen_parts.append(gen_stats)
            verify_parts.append(scored.verifier_stats)
            return scored

        split = cfg.learner.mini_batches * cfg.learner.ranks
        ds = cfg.algorithm.dynamic_sampling
        fill = fill_informative(sample, sched.prompts_per_step, max_rounds=ds.max_rounds, divisor=split)
        gen_s = sum(g["time/generate"] for g in gen_parts)
        tokens = sum(g["throughput/generate_tokens_per_s"] * g["time/generate"] for g in gen_parts)
        gen_stats = {"time/generate": gen_s, "throughput/generate_tokens_per_s": tokens / max(gen_s, 1e-9)}
        scored = fill.scored.model_copy(update={"verifier_stats": merge_stats(verify_parts)})
        # reward/* over every sampled group (the filtered batch has no solved / zero groups by construction)
        metrics = fill.metrics | reward_metrics(fill.sampled_rewards, sched.group_size)
        metrics["reward/kept_mean"] = float(scored.rewards.mean())
        return scored, gen_stats, fill.prompt_ids, metrics

    def advantages(self, scored: ScoredBatch, rewards: np.ndarray | None = None) -> np.ndarray:
        rewards = scored.rewards if rewards is None else rewards
        adv = advantages_from_config(
            self.cfg.algorithm.advantage, torch.tensor(rewards), torch.tensor(scored.rollout.prompt_index)
        )
        return adv.numpy().astype(np.float32)

    def train_step(self, step: int) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        cfg = self.cfg
        t_step = time.perf_counter()
        scored, gen_stats, prompt_ids, recipe_metrics = self.collect(step)
        self._data_state = self.data.stream.state_dict()  # what a checkpoint of this step resumes from
        if cfg.schedule.mode == "async" and step < cfg.schedule.steps:
            # Generation of step+1 overlaps this step's learning, with the weights of the previous step.
            nxt = encode_prompts(
                self.data.stream.next_batch(cfg.schedule.prompts_per_step), self.data.tokenizer, step + 1
            )
            self._pending = generation.launch(self.roles.generators, nxt, cfg.schedule.group_size)
        ol_cfg = cfg.algorithm.overlong
        overlong = handle_overlong(
            scored.rewards,
            scored.rollout.responses.lengths,
            scored.rollout.finish_reasons,
            mode=ol_cfg.mode,
            max_new_tokens=cfg.generator.max_new_tokens,
            buffer_tokens=ol_cfg.buffer_tokens,
            penalty=ol_cfg.penalty,
        )
        recipe_metrics |= overlong.metrics
        # advantages from the shaped rewards under the soft penalty; the metrics keep the verifier's
        adv = self.advantages(scored, overlong.rewards if ol_cfg.mode == "soft_penalty" else None)
        train = build_train_batch(scored, adv, step=step, loss_mask=overlong.loss_mask)
        ref_time = 0.0
        if len(self.roles.references):
            t0 = time.perf_counter()
            ref_logp, _ = self.roles.references.get(self.roles.references[0].logprobs.remote(train))
            train = train.model_copy(update={"ref_logprobs": ref_logp})
            ref_time = time.perf_counter() - t0
        train_ref = ray.put(train)
        top_k = cfg.metrics.inspector_top_k if _every(cfg.metrics.inspector_every, step) else 0
        overrides = self.controller.overrides() if self.controller else None
        stats = self.roles.learners.call(
            lambda lr: lr.train_step.remote(
                train_ref,
                step=step,
                measure_entropy_change=_every(cfg.learner.measure_entropy_change_every, step),
                inspect_top_k=top_k,
                loss_overrides=overrides,
                old_logprobs_from_sampler=cfg.schedule.mode == "async",
                entropy_probe=_every(cfg.learner.entropy_probe.every, step),
            )
        )
        self.version = stats[0].policy_version
        self.bad_steps = track_bad_steps(
            self.bad_steps, stats[0].metrics, step=step, limit=cfg.learner.max_bad_steps, run_dir=self.run_dir
        )
        self.weights.revive_generators()
        sync_s = self.weights.sync(self.version)
        metrics = self._step_metrics(scored, stats[0].metrics, gen_stats, ref_time, sync_s) | recipe_metrics
        if self.controller is not None:
            out = self.controller.update(step, stats[0].metrics["entropy/mean"])
            metrics |= out.metrics()
            if out.warning:
                print(f"  WARNING (entropy control): {out.warning}", flush=True)
        metrics["time/step"] = time.perf_counter() - t_step
        tables = {"prompt_ids": [{"step": step, "ids": prompt_ids}]}
        if stats[0].top_tokens:
            tables["inspector"] = inspect_tokens(self.data.tokenizer, train, scored, stats[0].top_tokens)
        return metrics, tables

    def _step_metrics(self, scored, learner_metrics, gen_stats, ref_time, sync_s) -> dict[str, float]:
        rollout = scored.rollout
        lengths = rollout.responses.lengths
        m = dict(learner_metrics) | gen_stats | scored.verifier_stats
        m |= reward_metrics(scored.rewards, rollout.group_size)
        m |= {
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response/truncated_frac": float((rollout.finish_reasons == 1).mean()),
            "time/reference": ref_time,
            "time/weight_sync": sync_s,
            "policy_version": float(self.version),
            "version_lag": float(self.version - 1 - rollout.policy_version),
        }
        return m

    def save_checkpoint(self, step: int) -> None:
        extra = {"entropy_control": self.controller.state_dict()} if self.controller else {}
        self.checkpointer.save(
            DriverState(
                step=step,
                policy_version=self.version,
                data_state=self._data_state,
                rng_seed=self.cfg.schedule.seed,
                extra=extra,
            )
        )

    def run(self) -> list[dict[str, Any]]:
        """Steps start_step+1 .. steps. Evaluation runs *before* a step's update (step 1 and every
        eval_every steps), so a row's eval/* and entropy/* describe the same policy (the law's pairs);
        the last row also carries final/* measured after the last update."""
        sched, rows = self.cfg.schedule, []
        for step in range(self.start_step + 1, sched.steps + 1):
            m: dict[str, float] = {}
            if step == 1 or (sched.eval_every and (step - 1) % sched.eval_every == 0):
                m |= self.evaluator.evaluate(step)
            # tables: the prompt ids of the step (data-order checks on resume) and the token inspector
            train_metrics, tables = self.train_step(step)
            m |= train_metrics
            if step == sched.steps:
                m |= {k.replace("eval/", "final/"): v for k, v in self.evaluator.evaluate(step).items()}
            self.roles.metrics.record.remote(
                MetricsRecord(step=step, role="driver", metrics=m, tables=tables)
            )
            row = ray.get(self.roles.metrics.flush_step.remote(step))
            rows.append(row)
            self.progress.update(row)
            if step == sched.steps or (sched.checkpoint_every and step % sched.checkpoint_every == 0):
                self.save_checkpoint(step)
        self.progress.close()
        return rows
