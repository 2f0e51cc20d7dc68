"""Split and merge typed batches between roles (pure numpy; no Ray).

The driver splits a PromptBatch across generator replicas by prompt rows (groups never straddle
replicas), merges their RolloutBatches back in prompt order, and turns a ScoredBatch into the
learner's TrainBatch.
"""

from __future__ import annotations

import numpy as np

from schemas.batches import PromptBatch, Ragged, RolloutBatch, ScoredBatch, TrainBatch


def split_prompts(batch: PromptBatch, parts: int) -> list[PromptBatch]:
    """Contiguous, near-equal shares of the prompt rows; empty shares are dropped."""
    bounds = np.linspace(0, len(batch), parts + 1).round().astype(np.int64)
    return [take_prompts(batch, np.arange(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def take_prompts(batch: PromptBatch, index: np.ndarray) -> PromptBatch:
    idx = [int(i) for i in index]
    return PromptBatch(
        step=batch.step,
        prompt_ids=batch.prompt_ids[index],
        tokens=batch.tokens.take(index),
        texts=[batch.texts[i] for i in idx],
        ground_truths=[batch.ground_truths[i] for i in idx],
        data_sources=[batch.data_sources[i] for i in idx],
        extras=None if batch.extras is None else [batch.extras[i] for i in idx],
    )


def concat_ragged(parts: list[Ragged]) -> Ragged:
    lengths = np.concatenate([p.lengths for p in parts])
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Ragged(values=np.concatenate([p.values for p in parts]), offsets=offsets)


def concat_prompts(parts: list[PromptBatch]) -> PromptBatch:
    extras = None if any(p.extras is None for p in parts) else [e for p in parts for e in p.extras]
    return PromptBatch(
        step=parts[0].step,
        prompt_ids=np.concatenate([p.prompt_ids for p in parts]),
        tokens=concat_ragged([p.tokens for p in parts]),
        texts=[t for p in parts for t in p.texts],
        ground_truths=[t for p in parts for t in p.ground_truths],
        data_sources=[t for p in parts for t in p.data_sources],
        extras=extras,
    )


def concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    """Merge replica outputs (in the order given). All parts must share group size and weight version."""
    if len(parts) == 1:
        return parts[0]
    versions = {p.policy_version for p in parts}
    if len({p.group_size for p in parts}) != 1 or len(versions) != 1:
        raise ValueError(
            f"cannot merge rollouts with different group sizes or weight versions {sorted(versions)}"
        )
    replicas = [p.replica for p in parts]
    return RolloutBatch(
        prompts=concat_prompts([p.prompts for p in parts]),
        group_size=parts[0].group_size,
        policy_version=parts[0].policy_version,
        responses=concat_ragged([p.responses for p in parts]),
        sampler_logprobs=np.concatenate([p.sampler_logprobs for p in parts]),
        finish_reasons=np.concatenate([p.finish_reasons for p in parts]),
        response_texts=[t for p in parts for t in p.response_texts],
        replica=None if any(r is None for r in replicas) else np.concatenate(replicas),
    )


def build_train_batch(
    scored: ScoredBatch,
    advantages: np.ndarray,
    *,
    step: int,
    ref_logprobs: np.ndarray | None = None,
    loss_mask: np.ndarray | None = None,
) -> TrainBatch:
    """Prompt+response rows for the learner; per-token arrays stay flat over response tokens."""
    rollout = scored.rollout
    prompt_rows = rollout.prompt_index
    prompts = rollout.prompts.tokens.take(prompt_rows)
    p_len, r_len = prompts.lengths, rollout.responses.lengths
    offsets = np.zeros(len(rollout) + 1, dtype=np.int64)
    np.cumsum(p_len + r_len, out=offsets[1:])
    values = np.empty(offsets[-1], dtype=np.int32)
    is_prompt = np.repeat(np.arange(len(rollout)), p_len + r_len)
    pos_in_row = np.arange(offsets[-1]) - offsets[:-1][is_prompt]
    prompt_slot = pos_in_row < p_len[is_prompt]
    values[prompt_slot] = prompts.values
    values[~prompt_slot] = rollout.responses.values
    return TrainBatch(
        step=step,
        policy_version=rollout.policy_version,
        sequences=Ragged(values=values, offsets=offsets),
        prompt_lengths=p_len.astype(np.int32),
        advantages=np.asarray(advantages, dtype=np.float32),
        sampler_logprobs=rollout.sampler_logprobs,
        ref_logprobs=ref_logprobs,
        loss_mask=loss_mask,
        prompt_index=prompt_rows,
    )
