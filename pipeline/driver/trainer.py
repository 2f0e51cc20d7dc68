"""The driver: owns the step loop and nothing heavy.

One synchronous step, as data flows (docs/architecture.md):
    prompts -> generators (vLLM) -> verifiers -> advantages -> [reference] -> learner ranks (DeepSpeed)
            -> weights to generators (one object, versioned) -> metrics
The driver moves object references between roles; large arrays go through the object store once
(``ray.put`` of the TrainBatch; the weights object goes learner -> generators without passing here).
Deviations from textbook GRPO: none by default (token-mean, no KL, no entropy bonus, group-normalised
advantages, PPO epochs x mini-batches over each rollout batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from actors.verifier import score_with_pool
from pipeline.core.advantages import compute_advantages
from pipeline.core.batching import build_train_batch
from pipeline.core.entropy_control import EntropyController
from pipeline.core.pass_at_k import pass_at_k_metrics
from pipeline.core.recipe import fill_informative, handle_overlong, reward_metrics
from pipeline.data.verifiers.base import merge_stats
from pipeline.driver import checkpoint as ckpt
from pipeline.driver.generation import GeneratorPool, Launched, RoleFailure
from pipeline.driver.progress import Progress
from pipeline.driver.roles import Roles
from schemas.batches import MetricsRecord, PromptBatch, Ragged, RolloutBatch, ScoredBatch
from schemas.run_config import RunConfig


@dataclass
class DataSource:
    """What the driver needs from the data layer: a resumable train stream and held-out rows."""

    stream: Any  # pipeline.data.datasets.PromptStream
    eval_rows: list[dict[str, Any]]
    tokenizer: Any


def encode_prompts(rows: list[dict[str, Any]], tokenizer: Any, step: int) -> PromptBatch:
    texts = [r["prompt"] for r in rows]
    # Plain prompts get the tokenizer's special tokens (e.g. BOS, as in SFT); chat-templated text already
    # carries them, so they are not added twice.
    bos = getattr(tokenizer, "bos_token", None)
    templated = bool(bos) and texts[0].startswith(bos)
    ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
    return PromptBatch(
        step=step,
        prompt_ids=np.asarray([int(r["index"]) for r in rows], dtype=np.int64),
        tokens=Ragged.from_lists(ids),
        texts=texts,
        ground_truths=[str(r["ground_truth"]) for r in rows],
        data_sources=[str(r.get("data_source", "default")) for r in rows],
        extras=[r.get("extra") or {} for r in rows],
    )


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


def _get_or_fail(role: str, refs: Any) -> Any:
    """ray.get that turns a dead actor into RoleFailure naming the role (the run then restarts from
    the latest checkpoint, see pipeline.train)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayActorError as e:
        raise RoleFailure(
            role, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        ) from None


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
        self.pool = GeneratorPool(roles.generators)
        self._pending: Launched | None = None  # async mode: the next step's generation, in flight
        self._data_state: dict[str, Any] = data.stream.state_dict()
        self.controller = make_controller(cfg)
        self.bad_steps = 0
        self._transfer_members: list[int] | None = None  # replicas in the collective weight-sync group

    # ------------------------------------------------------------------ roles, one call each
    def launch(self, prompts: PromptBatch, n: int, **kw: Any) -> Launched:
        """Start generation on every live replica (prompt rows split across them)."""
        return self.pool.launch(prompts, n, **kw)

    def generate(self, prompts: PromptBatch, n: int, **kw: Any) -> tuple[RolloutBatch, dict[str, float]]:
        return self.gather(self.launch(prompts, n, **kw))

    def gather(self, launched: Launched) -> tuple[RolloutBatch, dict[str, float]]:
        return self.pool.gather(launched)

    def score(self, rollout: RolloutBatch) -> ScoredBatch:
        p_idx = rollout.prompt_index
        prompts = rollout.prompts
        t0 = time.perf_counter()
        scores, reasons, stats = score_with_pool(
            self.roles.verifiers,
            prompts=[prompts.texts[i] for i in p_idx],
            responses=rollout.response_texts,
            ground_truths=[prompts.ground_truths[i] for i in p_idx],
            data_sources=[prompts.data_sources[i] for i in p_idx],
            extras=None if prompts.extras is None else [prompts.extras[i] for i in p_idx],
        )
        stats = dict(stats) | {"time/verify": time.perf_counter() - t0}
        return ScoredBatch(
            rollout=rollout,
            rewards=np.asarray(scores, dtype=np.float32),
            reasons=list(reasons),
            verifier_stats=stats,
        )

    def advantages(self, scored: ScoredBatch) -> np.ndarray:
        adv_cfg = self.cfg.algorithm.advantage
        kwargs: dict[str, Any] = {}
        if adv_cfg.name == "grpo":
            kwargs = {"norm_by_std": adv_cfg.norm_by_std, "eps": adv_cfg.eps}
        adv = compute_advantages(
            adv_cfg.name, torch.tensor(scored.rewards), torch.tensor(scored.rollout.prompt_index), **kwargs
        )
        return adv.numpy().astype(np.float32)

    def sync_weights(self) -> float:
        if self.cfg.weight_sync.method == "collective":
            return self._sync_weights_collective()
        t0 = time.perf_counter()
        learners = self.roles.learners
        if self.cfg.learner.zero_stage == 3:
            weights = learners[0].get_weights.remote()
            ray.get([lr.get_weights.remote() for lr in learners[1:]])
        else:
            weights = learners[0].get_weights.remote()
        gens = [self.roles.generators[i] for i in self.pool.live()]
        try:
            ray.get([g.load_weights.remote(weights, self.version) for g in gens])
        except ray.exceptions.RayActorError:
            # A replica died while loading: it is left out of the pool and revived (with weights) later.
            self._mark_dead_generators()
        return time.perf_counter() - t0

    def _sync_weights_collective(self) -> float:
        """vLLM weight transfer from learner rank 0 into every live replica (actors.weight_transfer).
        A dead or restarted replica cannot rejoin a running collective, so the group is rebuilt whenever
        the set of live replicas changes, and once after a failed broadcast (then the send is retried)."""
        t0 = time.perf_counter()
        for attempt in (1, 2):
            live = self.pool.live()
            if self._transfer_members != live:
                self._build_transfer_group(live)
            try:
                ray.get([lr.send_weights.remote(self.version) for lr in self.roles.learners])
                break
            except ray.exceptions.RayError:
                self._transfer_members = None
                # a survivor may still sit in its receive until the group's timeout: busy is not dead
                self._mark_dead_generators(timeout_s=self.cfg.weight_sync.timeout_s + 10)
                if attempt == 2:
                    raise
        return time.perf_counter() - t0

    def _build_transfer_group(self, live: list[int]) -> None:
        tp = self.cfg.generator.tensor_parallel_size
        gens = [self.roles.generators[i] for i in live]
        offsets = [1 + k * tp for k in range(len(live))]
        world = 1 + len(live) * tp
        ray.get(
            [
                lr.init_weight_transfer.remote(gens, offsets, world, self.cfg.weight_sync)
                for lr in self.roles.learners
            ]
        )
        self._transfer_members = live

    def _mark_dead_generators(self, timeout_s: float = 5.0) -> None:
        for i in self.pool.live():
            try:
                ray.get(self.roles.generators[i].info.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self.pool.dead.add(i)

    # ------------------------------------------------------------------ the step
    def collect(self, step: int) -> tuple[ScoredBatch, dict[str, float], list[int], dict[str, float]]:
        """Scored rollouts to train on, generation stats, every prompt id drawn and sampling metrics:
        one round, or dynamic sampling (``algorithm.dynamic_sampling``, pipeline.core.recipe.fill_informative)."""
        cfg, sched = self.cfg, self.cfg.schedule
        ds = cfg.algorithm.dynamic_sampling
        gen_parts: list[dict[str, float]] = []
        verify_parts: list[dict[str, float]] = []

        def sample(k: int) -> ScoredBatch:
            prompts = encode_prompts(self.data.stream.next_batch(k), self.data.tokenizer, step)
            rollout, g = self.generate(prompts, sched.group_size)
            scored = self.score(rollout)
            gen_parts.append(g)
            verify_parts.append(scored.verifier_stats)
            return scored

        if self._pending is not None:  # one-step-async: generation was launched during the last step
            rollout, g = self.gather(self._pending)
            self._pending = None
            scored = self.score(rollout)
            return scored, g, scored.rollout.prompts.prompt_ids.tolist(), {}
        if not ds.enabled:
            scored = sample(sched.prompts_per_step)
            return scored, gen_parts[0], scored.rollout.prompts.prompt_ids.tolist(), {}
        split = cfg.learner.mini_batches * cfg.learner.ranks
        fill = fill_informative(sample, sched.prompts_per_step, max_rounds=ds.max_rounds, divisor=split)
        gen_s = sum(g["time/generate"] for g in gen_parts)
        tokens = sum(g["throughput/generate_tokens_per_s"] * g["time/generate"] for g in gen_parts)
        gen_stats = {"time/generate": gen_s, "throughput/generate_tokens_per_s": tokens / max(gen_s, 1e-9)}
        scored = fill.scored.model_copy(update={"verifier_stats": merge_stats(verify_parts)})
        # reward/* over every sampled group (the filtered batch has no solved / zero groups by construction)
        metrics = fill.metrics | reward_metrics(fill.sampled_rewards, sched.group_size)
        metrics["reward/kept_mean"] = float(scored.rewards.mean())
        return scored, gen_stats, fill.prompt_ids, metrics

    def train_step(self, step: int) -> tuple[dict[str, float], list[int]]:
        cfg = self.cfg
        t_step = time.perf_counter()
        scored, gen_stats, prompt_ids, recipe_metrics = self.collect(step)
        self._data_state = self.data.stream.state_dict()  # what a checkpoint of this step resumes from
        if cfg.schedule.mode == "async" and step < cfg.schedule.steps:
            # Generation of step+1 overlaps this step's learning, with the weights of the previous step.
            nxt = encode_prompts(
                self.data.stream.next_batch(cfg.schedule.prompts_per_step), self.data.tokenizer, step + 1
            )
            self._pending = self.launch(nxt, cfg.schedule.group_size)
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
        if ol_cfg.mode == "soft_penalty":  # advantages from the shaped rewards; metrics keep the verifier's
            adv = self.advantages(scored.model_copy(update={"rewards": overlong.rewards}))
        else:
            adv = self.advantages(scored)
        train = build_train_batch(scored, adv, step=step, loss_mask=overlong.loss_mask)
        ref_time = 0.0
        if self.roles.references:
            t0 = time.perf_counter()
            ref_logp, _ = _get_or_fail("reference", self.roles.references[0].logprobs.remote(train))
            train = train.model_copy(update={"ref_logprobs": ref_logp})
            ref_time = time.perf_counter() - t0
        train_ref = ray.put(train)
        measure = _every(cfg.learner.measure_entropy_change_every, step)
        top_k = cfg.metrics.inspector_top_k if _every(cfg.metrics.inspector_every, step) else 0
        stats = _get_or_fail(
            "learner",
            [
                lr.train_step.remote(
                    train_ref,
                    step=step,
                    measure_entropy_change=measure,
                    inspect_top_k=top_k,
                    loss_overrides=self.controller.overrides() if self.controller else None,
                    old_logprobs_from_sampler=cfg.schedule.mode == "async",
                    entropy_probe=_every(cfg.learner.entropy_probe.every, step),
                )
                for lr in self.roles.learners
            ],
        )
        self.version = stats[0].policy_version
        self.bad_steps = track_bad_steps(
            self.bad_steps, stats[0].metrics, step=step, limit=cfg.learner.max_bad_steps, run_dir=self.run_dir
        )
        if self.pool.dead and self.pool.revive(timeout_s=5.0):
            print("  generator replica restarted: pushing current weights to it", flush=True)
            self._transfer_members = None  # a restarted process is not in the old collective group
        sync_s = self.sync_weights()
        metrics = self._step_metrics(scored, stats[0].metrics, gen_stats, ref_time, sync_s) | recipe_metrics
        if self.controller is not None:
            out = self.controller.update(step, stats[0].metrics["entropy/mean"])
            metrics |= out.metrics()
            if out.warning:
                print(f"  WARNING (entropy control): {out.warning}", flush=True)
        metrics["time/step"] = time.perf_counter() - t_step
        tables = {"prompt_ids": [{"step": step, "ids": prompt_ids}]}
        if stats[0].top_tokens:
            tables["inspector"] = self._inspect(train, scored, stats[0].top_tokens)
        return metrics, tables

    def _inspect(self, train, scored, top_tokens) -> list[dict[str, Any]]:
        """Decode the high-covariance tokens with their context so a user can read what drives collapse."""
        tok = self.data.tokenizer
        out = []
        for t in top_tokens:
            row, pos = int(t["row"]), int(t["t"])
            seq = train.sequences.row(row)
            p_len = int(train.prompt_lengths[row])
            out.append(
                t
                | {
                    "token": tok.decode([int(seq[p_len + pos])]),
                    "context": tok.decode(seq[max(0, p_len + pos - 48) : p_len + pos].tolist()),
                    "response": scored.rollout.response_texts[row],
                    "reward": float(scored.rewards[row]),
                }
            )
        return out

    def _step_metrics(self, scored, learner_metrics, gen_stats, ref_time, sync_s) -> dict[str, float]:
        rollout = scored.rollout
        lengths = rollout.responses.lengths
        m = dict(learner_metrics) | gen_stats | scored.verifier_stats
        m |= {
            "reward/mean": float(scored.rewards.mean()),
            "reward/std": float(scored.rewards.std()),
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response/truncated_frac": float((rollout.finish_reasons == 1).mean()),
            "time/reference": ref_time,
            "time/weight_sync": sync_s,
            "policy_version": float(self.version),
            "version_lag": float(self.version - 1 - rollout.policy_version),
        }
        group_rewards = scored.rewards.reshape(-1, rollout.group_size)
        m["reward/solved_groups_frac"] = float((group_rewards.min(1) == 1).mean())
        m["reward/zero_groups_frac"] = float((group_rewards.max(1) == 0).mean())
        return m

    def evaluate(self, step: int) -> dict[str, float]:
        sched = self.cfg.schedule
        rows = self.data.eval_rows[: sched.eval_prompts]
        prompts = encode_prompts(rows, self.data.tokenizer, step)
        t0 = time.perf_counter()
        rollout, _ = self.generate(
            prompts, sched.eval_samples, temperature=sched.eval_temperature, report=False
        )
        scored = self.score(rollout)
        correct = scored.rewards.reshape(len(rows), sched.eval_samples) >= 1.0
        return pass_at_k_metrics(correct) | {
            "eval/response_length": float(rollout.responses.lengths.mean()),
            "time/eval": time.perf_counter() - t0,
        }

    def save_checkpoint(self, step: int) -> None:
        partial = ckpt.begin(self.run_dir, step)
        ray.get([lr.save_checkpoint.remote(str(partial / "learner"), "ckpt") for lr in self.roles.learners])
        state = ckpt.DriverState(
            step=step,
            policy_version=self.version,
            data_state=self._data_state,
            rng_seed=self.cfg.schedule.seed,
            extra={"entropy_control": self.controller.state_dict()} if self.controller else {},
        )
        ckpt.commit(partial, state, keep=self.cfg.schedule.keep_checkpoints)

    def run(self) -> list[dict[str, Any]]:
        """Steps start_step+1 .. steps. Evaluation runs *before* a step's update (step 1 and every
        eval_every steps), so a row's eval/* and entropy/* describe the same policy (the law's pairs);
        the last row also carries final/* measured after the last update."""
        sched, rows = self.cfg.schedule, []
        for step in range(self.start_step + 1, sched.steps + 1):
            m: dict[str, float] = {}
            if step == 1 or (sched.eval_every and (step - 1) % sched.eval_every == 0):
                m |= self.evaluate(step)
            # tables: the prompt ids of the step (data-order checks on resume) and the token inspector
            train_metrics, tables = self.train_step(step)
            m |= train_metrics
            if step == sched.steps:
                m |= {k.replace("eval/", "final/"): v for k, v in self.evaluate(step).items()}
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
