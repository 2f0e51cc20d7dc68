"""Small helpers shared by tests (not part of covrl)."""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.batches import Ragged, TrainBatch, ragged_positions
from schemas.config import BUILTIN_LOSSES, PolicyLossBase


def loss_cfg(name: str = "ppo", **fields: Any) -> PolicyLossBase:
    """The ``name`` loss's config from settings shared by parametrized tests: fields the loss does not have
    are left out (each loss config refuses other losses' fields)."""
    cls = BUILTIN_LOSSES[name]
    return cls(name=name, **{k: v for k, v in fields.items() if k in cls.model_fields})


def synthetic_train_batch(
    n: int,
    *,
    seed: int = 0,
    prompt_len: tuple[int, int] = (2, 6),
    response_len: tuple[int, int] = (1, 9),
    vocab: tuple[int, int] = (3, 24),
    group_size: int = 4,
    adv_scale: float = 1.0,
    sampler_logprob: float = -3.0,
    loss_mask: np.ndarray | None = None,
) -> TrainBatch:
    """A random TrainBatch for tests and benchmarks: per row, prompt and response lengths drawn from the
    half-open ranges, token ids from ``vocab``, normal advantages; rows grouped ``group_size`` at a time."""
    rng = np.random.default_rng(seed)
    seqs, plen = [], []
    for _ in range(n):
        p, r = int(rng.integers(*prompt_len)), int(rng.integers(*response_len))
        seqs.append(rng.integers(*vocab, size=p + r).tolist())
        plen.append(p)
    sequences = Ragged.from_lists(seqs)
    response_tokens = int(sequences.values.shape[0] - sum(plen))
    return TrainBatch(
        step=1,
        policy_version=0,
        sequences=sequences,
        prompt_lengths=np.array(plen, np.int32),
        advantages=(rng.normal(size=n) * adv_scale).astype(np.float32),
        sampler_logprobs=np.full(response_tokens, sampler_logprob, np.float32),
        prompt_index=np.repeat(np.arange(n // group_size), group_size).astype(np.int64),
        loss_mask=loss_mask,
    )


def take_rows(batch: TrainBatch, rows: np.ndarray) -> TrainBatch:
    """Rows ``rows`` of ``batch`` as a new batch, the flat per-token arrays following them."""
    rows = np.asarray(rows, dtype=np.int64)
    flat = ragged_positions(batch.response_offsets, rows)
    return TrainBatch(
        step=batch.step,
        policy_version=batch.policy_version,
        sequences=batch.sequences.take(rows),
        prompt_lengths=batch.prompt_lengths[rows],
        advantages=batch.advantages[rows],
        sampler_logprobs=batch.sampler_logprobs[flat],
        ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[flat],
        loss_mask=None if batch.loss_mask is None else batch.loss_mask[rows],
        prompt_index=batch.prompt_index[rows],
    )
