"""Recipe pieces of the paper's training setup (DAPO-style), as pure functions (numpy/torch; no Ray).

- Dynamic sampling: drop prompt groups whose verifier rewards are all equal (all correct or all
  wrong: zero group advantage, no learning signal) and sample more prompts until the batch holds the
  wanted number of informative groups (:func:`fill_informative`; the driver passes it a function
  that generates and scores ``k`` fresh prompts).
- Overlong responses: mask truncated samples out of the loss, or DAPO's soft overlong punishment
  (:func:`soft_overlong_penalty`) added to the reward before advantages.
- Truncated importance sampling for the sampler/learner log-prob mismatch
  (:func:`truncated_is_weights`); the weights multiply each token's policy loss
  (``pipeline.core.aggregation.aggregate_loss(token_weights=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.core.batching import concat_rollouts, take_prompts
from schemas.batches import FINISH_LENGTH, RolloutBatch, ScoredBatch

# ------------------------------------------------------------------------------ dynamic sampling


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """bool [B]: groups (group-major rows) whose rewards are not all equal, i.e. that carry signal."""
    r = np.asarray(rewards).reshape(-1, group_size)
    return r.max(axis=1) != r.min(axis=1)


def _flat_rows(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat positions of ragged ``rows`` (in that order) in a layout with ``offsets``."""
    lengths = offsets[1:][rows] - offsets[:-1][rows]
    starts = np.repeat(offsets[:-1][rows], lengths)
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts + within


def _group_index(groups: np.ndarray, num_groups: int) -> np.ndarray:
    groups = np.asarray(groups)
    if groups.dtype == bool:
        if groups.shape != (num_groups,):
            raise ValueError(f"group mask: expected shape ({num_groups},), got {groups.shape}")
        return np.flatnonzero(groups)
    return groups.astype(np.int64)


def take_rollout_groups(rollout: RolloutBatch, groups: np.ndarray) -> RolloutBatch:
    """Prompt groups ``groups`` (bool mask [B] or group indices, kept in that order) of a rollout batch;
    responses, sampler log-probs and finish reasons follow their prompts."""
    g = rollout.group_size
    index = _group_index(groups, len(rollout.prompts))
    rows = (index[:, None] * g + np.arange(g)).reshape(-1)
    return RolloutBatch(
        prompts=take_prompts(rollout.prompts, index),
        group_size=g,
        policy_version=rollout.policy_version,
        responses=rollout.responses.take(rows),
        sampler_logprobs=rollout.sampler_logprobs[_flat_rows(rollout.responses.offsets, rows)],
        finish_reasons=rollout.finish_reasons[rows],
        response_texts=[rollout.response_texts[i] for i in rows.tolist()],
        replica=None if rollout.replica is None else rollout.replica[rows],
    )


def take_scored_groups(scored: ScoredBatch, groups: np.ndarray) -> ScoredBatch:
    """:func:`take_rollout_groups` for a scored batch (rewards and reasons follow)."""
    rollout = scored.rollout
    g = rollout.group_size
    index = _group_index(groups, len(rollout.prompts))
    rows = (index[:, None] * g + np.arange(g)).reshape(-1)
    return ScoredBatch(
        rollout=take_rollout_groups(rollout, index),
        rewards=scored.rewards[rows],
        reasons=[scored.reasons[i] for i in rows.tolist()],
        verifier_stats=dict(scored.verifier_stats),
    )


def concat_scored(parts: list[ScoredBatch]) -> ScoredBatch:
    """Scored batches one after another (same group size and weight version); the first part's
    verifier stats are kept (the driver merges the rounds' stats itself)."""
    if len(parts) == 1:
        return parts[0]
    return ScoredBatch(
        rollout=concat_rollouts([p.rollout for p in parts]),
        rewards=np.concatenate([p.rewards for p in parts]),
        reasons=[r for p in parts for r in p.reasons],
        verifier_stats=dict(parts[0].verifier_stats),
    )


def groups_unit(group_size: int, divisor: int) -> int:
    """Smallest number of groups k > 0 with ``k * group_size`` divisible by ``divisor`` (the learner
    splits the batch into ``mini_batches * ranks`` equal parts)."""
    return divisor // math.gcd(group_size, divisor)


def next_round_prompts(missing: int, informative: int, sampled: int, need: int, margin: float = 1.25) -> int:
    """Prompts to sample in the next round: the shortfall divided by the informative rate seen so far
    (times a margin), at least ``missing`` and at most ``need`` (the configured generation batch)."""
    if informative == 0:
        return need
    want = math.ceil(missing * sampled / informative * margin)
    return int(min(need, max(missing, want)))


@dataclass
class FillResult:
    scored: ScoredBatch  # the groups to train on (group-major)
    sampled_rewards: np.ndarray  # float32 [all sampled rollouts]: verifier rewards of every round
    prompt_ids: list[int]  # dataset ids of every prompt sampled, in stream order
    metrics: dict[str, float] = field(default_factory=dict)


def fill_informative(
    sample_fn: Callable[[int], ScoredBatch],
    need: int,
    *,
    max_rounds: int,
    divisor: int = 1,
) -> FillResult:
    """Dynamic sampling: call ``sample_fn(k)`` (generate and score ``k`` fresh prompts) until ``need``
    informative groups are collected or ``max_rounds`` rounds are done.

    Round 1 samples ``need`` prompts; later rounds sample the shortfall scaled by the informative rate
    seen so far (:func:`next_round_prompts`). Informative groups are kept in sampling order and the
    batch is cut at ``need`` (surplus groups are dropped). If the cap is hit short, the batch is trimmed
    to the largest number of groups the learner can split (``groups * G`` divisible by ``divisor``);
    if that is 0 the first round's batch is used unfiltered (every advantage is 0 or nearly so; the
    step still runs, and ``sampling/fallback_unfiltered`` says so).

    Metrics: ``sampling/rounds``, ``sampling/kept_groups`` (groups in the returned batch),
    ``sampling/filtered_frac`` (uninformative groups / groups sampled, all rounds),
    ``sampling/sampled_groups``, ``sampling/surplus_groups``,
    ``sampling/trimmed_groups`` (informative groups dropped to fit ``divisor``),
    ``sampling/fallback_unfiltered``.
    """
    if need < 1 or max_rounds < 1:
        raise ValueError(f"need and max_rounds must be >= 1, got {need}, {max_rounds}")
    kept: list[ScoredBatch] = []
    rewards: list[np.ndarray] = []
    prompt_ids: list[int] = []
    first: ScoredBatch | None = None
    n_kept = n_informative = n_sampled = rounds = surplus = 0
    group_size = 1
    while rounds < max_rounds and n_kept < need:
        k = need if rounds == 0 else next_round_prompts(need - n_kept, n_informative, n_sampled, need)
        scored = sample_fn(k)
        rounds += 1
        if first is None:
            first = scored
        group_size = scored.rollout.group_size
        rewards.append(scored.rewards)
        prompt_ids += scored.rollout.prompts.prompt_ids.tolist()
        good = np.flatnonzero(informative_groups(scored.rewards, group_size))
        n_sampled += len(scored.rollout.prompts)
        n_informative += len(good)
        take = good[: need - n_kept]
        surplus += len(good) - len(take)
        if len(take):
            kept.append(take_scored_groups(scored, take))
            n_kept += len(take)
    assert first is not None
    trimmed, fallback = 0, 0.0
    if n_kept < need:
        unit = groups_unit(group_size, divisor)
        usable = n_kept // unit * unit
        trimmed = n_kept - usable
        if usable == 0:
            batch, fallback, n_kept = first, 1.0, len(first.rollout.prompts)
        else:
            batch = take_scored_groups(concat_scored(kept), np.arange(usable))
            n_kept = usable
    else:
        batch = concat_scored(kept)
    metrics = {
        "sampling/rounds": float(rounds),
        "sampling/kept_groups": float(n_kept),
        "sampling/filtered_frac": 1.0 - n_informative / n_sampled,
        "sampling/sampled_groups": float(n_sampled),
        "sampling/surplus_groups": float(surplus),
        "sampling/trimmed_groups": float(trimmed),
        "sampling/fallback_unfiltered": fallback,
    }
    return FillResult(batch, np.concatenate(rewards).astype(np.float32), prompt_ids, metrics)


def reward_metrics(rewards: np.ndarray, group_size: int) -> dict[str, float]:
    """``reward/*`` over sampled groups (with dynamic sampling: every round, before filtering)."""
    groups = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    return {
        "reward/mean": float(groups.mean()),
        "reward/std": float(groups.std()),
        "reward/solved_groups_frac": float((groups.min(1) == 1).mean()),
        "reward/zero_groups_frac": float((groups.max(1) == 0).mean()),
    }


# ------------------------------------------------------------------------------ overlong responses


def soft_overlong_penalty(
    lengths: np.ndarray, max_new_tokens: int, buffer_tokens: int, penalty: float
) -> np.ndarray:
    """DAPO's soft overlong punishment, float32 [N]: 0 up to ``max_new_tokens - buffer_tokens`` tokens,
    then linearly down to ``-penalty`` at ``max_new_tokens`` (and below it for longer responses, which
    only happen when lengths are not capped there: clipped at ``-penalty``)."""
    if not 1 <= buffer_tokens <= max_new_tokens:
        raise ValueError(
            f"buffer_tokens must be in [1, max_new_tokens={max_new_tokens}], got {buffer_tokens}"
        )
    exceed = np.asarray(lengths, dtype=np.float64) - (max_new_tokens - buffer_tokens)
    return (-penalty * np.clip(exceed / buffer_tokens, 0.0, 1.0)).astype(np.float32)


@dataclass
class OverlongResult:
    rewards: np.ndarray  # float32 [N]: rewards for the advantages (shaped with soft_penalty)
    loss_mask: np.ndarray | None  # float32 [N] with mode 'mask' (0 = truncated), else None
    metrics: dict[str, float]


def handle_overlong(
    rewards: np.ndarray,
    lengths: np.ndarray,
    finish_reasons: np.ndarray,
    *,
    mode: str,
    max_new_tokens: int,
    buffer_tokens: int,
    penalty: float,
) -> OverlongResult:
    """Apply ``algorithm.overlong``: 'none' passes through; 'mask' drops samples that finished by
    length from the loss (``TrainBatch.loss_mask``); 'soft_penalty' adds :func:`soft_overlong_penalty`
    to the rewards. Metrics: ``overlong/masked_frac`` and ``overlong/penalty_mean``."""
    rewards = np.asarray(rewards, dtype=np.float32)
    truncated = np.asarray(finish_reasons) == FINISH_LENGTH
    if mode == "none":
        return OverlongResult(rewards, None, {})
    if mode == "mask":
        mask = (~truncated).astype(np.float32)
        return OverlongResult(
            rewards, mask, {"overlong/masked_frac": float(truncated.mean()) if truncated.size else 0.0}
        )
    if mode == "soft_penalty":
        pen = soft_overlong_penalty(lengths, max_new_tokens, buffer_tokens, penalty)
        return OverlongResult(
            (rewards + pen).astype(np.float32),
            None,
            {
                "overlong/penalty_mean": float(pen.mean()) if pen.size else 0.0,
                "overlong/penalized_frac": float((pen < 0).mean()) if pen.size else 0.0,
            },
        )
    raise ValueError(f"unknown overlong mode {mode!r}; choose 'none', 'mask' or 'soft_penalty'")


# ------------------------------------------------------------------------------ IS correction


def truncated_is_weights(
    old_logp: np.ndarray | torch.Tensor,
    sampler_logp: np.ndarray | torch.Tensor,
    cap: float,
    valid: np.ndarray | torch.Tensor | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Per-token truncated IS weights ``min(exp(old_logp_learner - sampler_logp), cap)`` (flat float32,
    constants) and ``mismatch/is_weight_mean`` / ``mismatch/is_clipped_frac`` (fraction of tokens whose
    ratio exceeds ``cap``) over the ``valid`` tokens (all when None)."""
    old = np.asarray(old_logp, dtype=np.float64)
    samp = np.asarray(sampler_logp, dtype=np.float64)
    log_ratio = np.clip(old - samp, -20.0, 20.0)
    ratio = np.exp(log_ratio)
    w = np.minimum(ratio, cap).astype(np.float32)
    v = np.ones(w.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    n = int(v.sum())
    stats = {
        "mismatch/is_weight_mean": float(w[v].mean()) if n else 1.0,
        "mismatch/is_clipped_frac": float((ratio[v] > cap).mean()) if n else 0.0,
    }
    return w, stats
