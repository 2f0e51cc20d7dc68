"""Batch contracts: validation catches inconsistent shapes/dtypes once per batch; ragged helpers."""

import numpy as np
import pytest

from pipeline.core.batching import build_train_batch, concat_rollouts, split_prompts
from schemas.batches import PromptBatch, Ragged, RolloutBatch, ScoredBatch, TrainBatch, ragged_positions
from tests.helpers import take_rows


def prompt_batch(b=3, step=0):
    return PromptBatch(
        step=step,
        prompt_ids=np.arange(b, dtype=np.int64),
        tokens=Ragged.from_lists([[1, 2, 3][: i + 1] for i in range(b)]),
        texts=[f"p{i}" for i in range(b)],
        ground_truths=[str(i) for i in range(b)],
        data_sources=["a"] * b,
    )


def rollout(prompts, g=2, version=0):
    n = len(prompts) * g
    resp = Ragged.from_lists([[10 + i] * (i % 3 + 1) for i in range(n)])
    return RolloutBatch(
        prompts=prompts,
        group_size=g,
        policy_version=version,
        responses=resp,
        sampler_logprobs=-np.arange(resp.values.shape[0], dtype=np.float32),
        finish_reasons=np.zeros(n, np.int8),
        response_texts=[f"r{i}" for i in range(n)],
    )


def test_ragged_round_trip_and_take():
    r = Ragged.from_lists([[5, 6, 7], [8], []])
    assert r.values.tolist() == [5, 6, 7, 8] and r.offsets.tolist() == [0, 3, 4, 4]
    assert r.take(np.array([1, 0])).tolist() == [[8], [5, 6, 7]]
    assert r.lengths.tolist() == [3, 1, 0]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(values=np.zeros(3, np.int64), offsets=np.array([0, 3])), "dtype"),
        (dict(values=np.zeros(3, np.int32), offsets=np.array([0, 2])), "end at len"),
        (dict(values=np.zeros(3, np.int32), offsets=np.array([0, 2, 1, 3])), "non-decreasing"),
    ],
)
def test_ragged_rejects_inconsistent(bad, match):
    with pytest.raises(ValueError, match=match):
        Ragged(**bad)


def test_rollout_validation_catches_wrong_lengths():
    p = prompt_batch()
    good = rollout(p)
    with pytest.raises(ValueError, match="B\\*G"):
        RolloutBatch(**(good.__dict__ | {"group_size": 3}))
    with pytest.raises(ValueError, match="sampler_logprobs"):
        RolloutBatch(**(good.__dict__ | {"sampler_logprobs": np.zeros(1, np.float32)}))
    with pytest.raises(ValueError, match="texts"):
        PromptBatch(**(p.__dict__ | {"texts": ["only one"]}))


def test_arrays_are_read_only_after_validation():
    p = prompt_batch()
    with pytest.raises(ValueError):
        p.prompt_ids[0] = 7


def test_split_and_concat_rollouts_preserve_order():
    p = prompt_batch(5)
    parts = split_prompts(p, 2)
    assert [len(x) for x in parts] == [2, 3] or [len(x) for x in parts] == [3, 2]
    merged = concat_rollouts([rollout(x) for x in parts])
    assert merged.prompts.prompt_ids.tolist() == list(range(5))
    assert len(merged) == 10


def test_build_train_batch_layout():
    p = prompt_batch(2)
    r = rollout(p, g=2)
    scored = ScoredBatch(rollout=r, rewards=np.array([1, 0, 0, 1], np.float32), reasons=[None] * 4)
    tb = build_train_batch(scored, np.array([1, -1, -1, 1], np.float32), step=3)
    # row 2 = prompt 1 ([1, 2]) + response 2 ([12, 12, 12])
    assert tb.sequences.row(2).tolist() == [1, 2, 12, 12, 12]
    assert tb.prompt_lengths.tolist() == [1, 1, 2, 2]
    assert tb.response_lengths.tolist() == [1, 2, 3, 1]
    sub = take_rows(tb, np.array([2, 0]))
    assert sub.sequences.row(0).tolist() == [1, 2, 12, 12, 12]
    assert sub.sampler_logprobs.tolist() == [-3, -4, -5, 0]


def test_train_batch_rejects_prompt_longer_than_sequence():
    with pytest.raises(ValueError, match="prompt_lengths"):
        TrainBatch(
            step=0,
            policy_version=0,
            sequences=Ragged.from_lists([[1, 2]]),
            prompt_lengths=np.array([3], np.int32),
            advantages=np.zeros(1, np.float32),
            sampler_logprobs=np.zeros(0, np.float32),
            prompt_index=np.zeros(1, np.int64),
        )


def test_ragged_positions_is_the_one_flat_index():
    # lengths 2, 3, 1 -> offsets 0, 2, 5, 6; rows 2 then 0 -> positions 5, then 0, 1
    offsets = np.array([0, 2, 5, 6])
    assert ragged_positions(offsets, np.array([2, 0])).tolist() == [5, 0, 1]
    assert ragged_positions(offsets, np.array([1])).tolist() == [2, 3, 4]
    assert ragged_positions(offsets, np.array([], dtype=np.int64)).tolist() == []
