"""One RL step of learning on a TrainBatch: old log-probs, PPO epochs x mini-batches, entropy probe.

Engine-agnostic (no DeepSpeed import): the learner actor passes an object with ``module``,
``backward(loss)`` and ``step() -> grad_norm`` (a DeepSpeed engine wrapper), and ``all_gather`` for
its data-parallel group. Tests drive it with a plain torch optimizer and compare 1 vs 2 "ranks".

How a step splits the batch (same on every rank, seeded by step and epoch):
    rows --permute--> mini-batches (learner.mini_batches) --contiguous shard--> ranks --> micro-batches
Each micro-batch loss is normalised by the *global* token/sequence count of its mini-batch, and
backward is scaled by the world size (DeepSpeed averages gradients across ranks), so the update is
the same however the mini-batch is cut into micro-batches and ranks.

Token selection of Clip-Cov / KL-Cov (losses that declare a ``TokenSelector``) with
``learner.selection_scope: mini_batch`` -- covrl's fix of the reference's per-micro-batch selection --
runs once per mini-batch over every rank's tokens: the ranks all-gather (current logp, old logp,
advantage) per token, every rank runs the same seeded selection and keeps its slice. As in the paper's
code, tokens are ranked by the *current* policy's log-probs (``selection_logprobs: current``, the
default), which also tell Clip-Cov which tokens the PPO clip already zeroes. Where those come from:

- the first micro-batch of the rank's share: the detached output of the forward that computes its loss;
  selection sits between that forward and its backward (its graph is kept meanwhile);
- the other micro-batches, if any: one lean no-grad pass (log-probs only). Fused (every rank's share fits
  one micro-batch, as in the default job) this costs no extra pass at all; with M micro-batches, (M-1)/M
  of a forward. The first update of a step needs neither: the current policy is the step-start one.

``selection_logprobs: step_start`` (an opt-in approximation, docs/architecture.md) ranks by the
step-start log-probs instead; Clip-Cov still excludes clipped tokens by the current ratio, so it still
needs the current log-probs; KL-Cov then needs no pass at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.core.covariance import covariance_stats, token_covariance
from pipeline.core.entropy_dynamics import predicted_entropy_change
from pipeline.core.entropy_probe import sgd_entropy_probe
from pipeline.core.losses import get_policy_loss, get_token_selector, kl_penalty
from pipeline.core.mini_batch import StepState, update_mini_batch
from pipeline.core.model_forward import batch_logprobs
from pipeline.core.ranks import (
    AllGather,
    Trainable,
    flat_positions,
    gather_full,
    shard,
    single_process_gather,
)
from pipeline.core.recipe import truncated_is_weights
from schemas.batches import TrainBatch
from schemas.run_config import AlgorithmConfig, LearnerConfig


def ppo_update(
    trainable: Trainable,
    batch: TrainBatch,
    *,
    algo: AlgorithmConfig,
    learner: LearnerConfig,
    temperature: float,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    all_gather: AllGather = single_process_gather,
    measure_entropy_change: bool = False,
    inspect_top_k: int = 0,
    old_logprobs_from_sampler: bool = False,
    full_logits: bool = False,
    entropy_probe_lrs: Sequence[float] = (),
) -> UpdateResult:
    """Runs the update in place on ``trainable``; returns step metrics (identical on every rank) and,
    when ``inspect_top_k`` > 0, the batch's top tokens by covariance (before the update).
    ``entropy_probe_lrs``: rank 0 first probes one SGD step per lr from the step-start weights
    (``pipeline.core.entropy_probe``; the weights are restored before the update)."""
    model, loss_cfg = trainable.module, algo.policy_loss
    n = len(batch)
    r_len = batch.response_lengths
    adv_flat = np.repeat(batch.advantages, r_len).astype(np.float32)
    fwd = dict(
        micro_batch_size=learner.micro_batch_size,
        temperature=temperature,
        full_logits=full_logits,
        token_budget=learner.micro_batch_tokens,
    )

    # Old log-probs (and entropy before the update) of the policy that starts this step, gathered.
    static_rows = shard(np.arange(n), rank, world_size)
    model.eval()
    old_local, ent_local = batch_logprobs(model, batch, static_rows, with_entropy=True, **fwd)
    own = flat_positions(batch, static_rows)
    start_flat, ent_flat = gather_full(all_gather, batch, own, old_local[own], ent_local[own])
    metrics = _step_start_metrics(batch, start_flat, ent_flat, adv_flat)
    if entropy_probe_lrs and rank == 0:
        metrics |= sgd_entropy_probe(
            model,
            batch,
            lrs=entropy_probe_lrs,
            temperature=temperature,
            micro_batch_size=learner.micro_batch_size,
            full_logits=full_logits,
        )
    top_tokens = _top_covariance_tokens(batch, start_flat, adv_flat, inspect_top_k) if inspect_top_k else []
    # Samples with loss_mask 0 (e.g. overlong) carry no loss, count in no denominator and are never selected.
    row_kept = np.ones(n, bool) if batch.loss_mask is None else batch.loss_mask > 0
    valid_flat = np.repeat(row_kept, r_len)
    # Truncated IS correction of the sampler/learner mismatch (weights logged even when not applied).
    is_weights, is_stats = truncated_is_weights(
        start_flat, batch.sampler_logprobs, algo.is_correction.cap, valid_flat
    )
    metrics |= is_stats
    # PPO's "old" policy: the learner's recomputation (sync mode), or the sampler's own log-probs when the
    # batch was generated with weights a version behind (one-step-async): ratios then correct the lag.
    old_flat = start_flat
    if old_logprobs_from_sampler:
        old_flat = np.asarray(batch.sampler_logprobs, dtype=np.float32)
    state = StepState(
        batch=batch,
        algo=algo,
        learner=learner,
        loss_fn=get_policy_loss(loss_cfg.name),
        selector=get_token_selector(loss_cfg.name) if learner.selection_scope == "mini_batch" else None,
        temperature=temperature,
        full_logits=full_logits,
        old=old_flat,
        step_start=start_flat,
        advantages=adv_flat,
        valid=valid_flat,
        is_weights=is_weights if algo.is_correction.enabled else None,
        generator=torch.Generator().manual_seed(seed),
        rank=rank,
        world_size=world_size,
        all_gather=all_gather,
    )

    rng = np.random.default_rng(seed)
    updates, skipped, grad_norms = 0, 0, []
    model.train()
    for epoch in range(learner.epochs):
        perm = rng.permutation(n)
        for mini_idx, mini in enumerate(np.array_split(perm, learner.mini_batches)):
            update_mini_batch(trainable, state, mini, first=epoch == 0 and mini_idx == 0)
            grad_norm = trainable.step()
            updates += 1
            if grad_norm is not None and not np.isfinite(grad_norm):
                skipped += 1
            elif grad_norm is not None:
                grad_norms.append(float(grad_norm))
    metrics |= state.acc.global_means(all_gather, "actor/")
    # mean over updates of the mini-batch loss (every rank's parts summed), independent of the split
    metrics["actor/loss"] = float(sum(all_gather(state.loss_sum))) / max(updates, 1)
    metrics["actor/updates"] = float(updates)
    metrics["actor/skipped_updates"] = float(skipped)
    metrics["actor/nonfinite_micro_batches"] = float(sum(all_gather(state.nonfinite)))
    if grad_norms:
        metrics["actor/grad_norm"] = float(np.mean(grad_norms))
    if measure_entropy_change:
        model.eval()
        _, ent_after_local = batch_logprobs(model, batch, static_rows, with_entropy=True, **fwd)
        (ent_after,) = gather_full(all_gather, batch, own, ent_after_local[own])
        metrics["entropy/after_update"] = float(ent_after.mean())
        metrics["entropy/measured_change"] = metrics["entropy/after_update"] - metrics["entropy/mean"]
    return UpdateResult(metrics, top_tokens)


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    top_tokens: list[dict[str, float]] = field(default_factory=list)


def _top_covariance_tokens(
    batch: TrainBatch, old: np.ndarray, adv: np.ndarray, k: int
) -> list[dict[str, float]]:
    """The k tokens with the largest covariance term (A - mean A)(logp - mean logp): the ones that
    drive entropy down. ``row``/``t`` locate them (sample row, response position)."""
    cov = (adv - adv.mean()) * (old - old.mean())
    k = min(k, cov.shape[0])
    top = np.argpartition(-cov, k - 1)[:k] if k else np.zeros(0, np.int64)
    top = top[np.argsort(-cov[top])]
    offsets = batch.response_offsets
    rows = np.searchsorted(offsets, top, side="right") - 1
    return [
        {
            "row": int(r),
            "t": int(i - offsets[r]),
            "cov": float(cov[i]),
            "advantage": float(adv[i]),
            "logprob": float(old[i]),
            "prob": float(np.exp(old[i])),
        }
        for i, r in zip(top, rows)
    ]


def _step_start_metrics(
    batch: TrainBatch, old: np.ndarray, ent: np.ndarray, adv: np.ndarray
) -> dict[str, float]:
    """Entropy, covariance and sampler/learner mismatch of the batch before any update."""
    lp, a = torch.from_numpy(old), torch.from_numpy(adv)
    mask = torch.ones_like(lp, dtype=torch.bool)
    cov = token_covariance(lp, a, mask)
    diff = np.abs(old - batch.sampler_logprobs)
    out = {
        "entropy/mean": float(ent.mean()) if ent.size else 0.0,
        "entropy/p10": float(np.percentile(ent, 10)) if ent.size else 0.0,
        "entropy/p50": float(np.percentile(ent, 50)) if ent.size else 0.0,
        "entropy/p90": float(np.percentile(ent, 90)) if ent.size else 0.0,
        "entropy/predicted_change": float(predicted_entropy_change(lp, a, mask)),
        "mismatch/logprob_abs_mean": float(diff.mean()) if diff.size else 0.0,
        "mismatch/logprob_abs_max": float(diff.max()) if diff.size else 0.0,
        # KL(sampler || learner) estimated on sampled tokens (k3, always >= 0).
        "mismatch/kl": float(kl_penalty(torch.tensor(batch.sampler_logprobs), lp, "k3").mean())
        if diff.size
        else 0.0,
    }
    out |= {k: float(v) for k, v in covariance_stats(cov, mask).items() if k != "cov/selected_frac"}
    return out
