"""Typed batches that cross actor boundaries.

Shape vocabulary (one spelling per concept, used everywhere):
    B  prompts in a step            G  samples per prompt (group size)
    N  = B * G rollouts             T  tokens (ragged: flat values + offsets)

Ragged token sequences are stored CSR-style, ``values`` flat and ``offsets`` of length n+1, so a
batch is a handful of contiguous numpy arrays: Ray moves them through the object store zero-copy
(pickle protocol 5 out-of-band buffers) and nothing is padded until the learner packs its own
micro-batches. Example: sequences [5, 6, 7] and [8] -> values [5, 6, 7, 8], offsets [0, 3, 4].

Rollouts are group-major: sample ``g`` of prompt ``b`` sits at row ``b * G + g``.

Validation happens once, in the producer, when a batch is constructed: dtypes, shapes and
cross-field lengths are checked with O(1) numpy calls, never element by element. Models are
frozen; arrays are made read-only so a consumer can never mutate a producer's buffer.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = 0, 1, 2
FINISH_REASONS = {"stop": FINISH_STOP, "length": FINISH_LENGTH, "abort": FINISH_ABORT}


class ArrayModel(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")


def _check(arr: Any, name: str, dtype: Any, ndim: int, length: int | None = None) -> None:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-d array, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name}: expected length {length}, got {arr.shape[0]}")
    arr.flags.writeable = False


def _check_list(items: Any, name: str, length: int) -> None:
    if not isinstance(items, list):
        raise ValueError(f"{name}: expected a list, got {type(items).__name__}")
    if len(items) != length:
        raise ValueError(f"{name}: expected {length} items, got {len(items)}")


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """Row offsets of a ragged layout: lengths [2, 3, 1] -> [0, 2, 5, 6]."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def ragged_positions(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat positions of the elements of ``rows`` (in that order) in a ragged layout with ``offsets``.

    The one ragged-index helper every flat per-token array uses. Example: offsets [0, 2, 5, 6] (lengths
    2, 3, 1), rows [2, 0] -> [5, 0, 1].
    """
    rows = np.asarray(rows, dtype=np.int64)
    lengths = offsets[1:][rows] - offsets[:-1][rows]
    new = offsets_from_lengths(lengths)
    return np.repeat(offsets[:-1][rows] - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)


class Ragged(ArrayModel):
    """A list of variable-length int32 token sequences as flat ``values`` plus ``offsets`` (n+1)."""

    values: np.ndarray
    offsets: np.ndarray

    @model_validator(mode="after")
    def _validate(self) -> Ragged:
        _check(self.values, "values", np.int32, 1)
        _check(self.offsets, "offsets", np.int64, 1)
        if self.offsets.shape[0] < 1 or self.offsets[0] != 0 or self.offsets[-1] != self.values.shape[0]:
            raise ValueError("offsets must start at 0 and end at len(values)")
        if self.offsets.shape[0] > 1 and np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        return self

    @classmethod
    def from_lists(cls, seqs: list[list[int]] | list[np.ndarray]) -> Ragged:
        offsets = offsets_from_lengths(np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs)))
        values = (
            np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
            if len(seqs) and offsets[-1]
            else np.zeros(0, np.int32)
        )
        return cls(values=values.astype(np.int32, copy=False), offsets=offsets)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def tolist(self) -> list[list[int]]:
        return [self.row(i).tolist() for i in range(len(self))]

    def take(self, index: np.ndarray) -> Ragged:
        """Rows ``index`` (in that order) as a new Ragged; one vectorised gather."""
        index = np.asarray(index, dtype=np.int64)
        offsets = offsets_from_lengths(self.lengths[index])
        return Ragged(values=self.values[ragged_positions(self.offsets, index)], offsets=offsets)


class PromptBatch(ArrayModel):
    """B prompts for one step, as produced by the data stream."""

    step: int = Field(ge=0)
    prompt_ids: np.ndarray  # int64 [B]: stable dataset row ids (for resume / data-order checks)
    tokens: Ragged  # [B] prompt token ids (chat template applied)
    texts: list[str]  # [B]
    ground_truths: list[str]  # [B]
    data_sources: list[str]  # [B]
    extras: list[dict[str, Any]] | None = None  # [B] free per-row fields passed to verifiers

    @model_validator(mode="after")
    def _validate(self) -> PromptBatch:
        _check(self.prompt_ids, "prompt_ids", np.int64, 1)
        b = self.prompt_ids.shape[0]
        if len(self.tokens) != b:
            raise ValueError(f"tokens: expected {b} rows, got {len(self.tokens)}")
        for name in ("texts", "ground_truths", "data_sources"):
            _check_list(getattr(self, name), name, b)
        if self.extras is not None:
            _check_list(self.extras, "extras", b)
        return self

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


class RolloutBatch(ArrayModel):
    """N = B*G sampled responses (group-major) with the sampler's per-token log-probs."""

    prompts: PromptBatch
    group_size: int = Field(ge=1)
    policy_version: int = Field(ge=0, description="Weight version the generator sampled with.")
    responses: Ragged  # [N] response token ids
    sampler_logprobs: np.ndarray  # float32 [sum T], aligned with responses.values
    finish_reasons: np.ndarray  # int8 [N]: FINISH_STOP / FINISH_LENGTH / FINISH_ABORT
    response_texts: list[str]  # [N]
    replica: np.ndarray | None = None  # int16 [N]: which generator replica sampled each row

    @model_validator(mode="after")
    def _validate(self) -> RolloutBatch:
        n = len(self.prompts) * self.group_size
        if len(self.responses) != n:
            raise ValueError(f"responses: expected B*G = {n} rows, got {len(self.responses)}")
        _check(self.sampler_logprobs, "sampler_logprobs", np.float32, 1, self.responses.values.shape[0])
        _check(self.finish_reasons, "finish_reasons", np.int8, 1, n)
        _check_list(self.response_texts, "response_texts", n)
        if self.replica is not None:
            _check(self.replica, "replica", np.int16, 1, n)
        return self

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def prompt_index(self) -> np.ndarray:
        """int64 [N]: the prompt row of each rollout."""
        return np.repeat(np.arange(len(self.prompts), dtype=np.int64), self.group_size)


class ScoredBatch(ArrayModel):
    """A rollout batch with one reward and an optional reason per sample."""

    rollout: RolloutBatch
    rewards: np.ndarray  # float32 [N]
    reasons: list[str | None]  # [N]; None when the verifier had nothing to say
    verifier_stats: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _validate(self) -> ScoredBatch:
        n = len(self.rollout)
        _check(self.rewards, "rewards", np.float32, 1, n)
        _check_list(self.reasons, "reasons", n)
        if not np.all(np.isfinite(self.rewards)):
            raise ValueError("rewards must be finite")
        return self


class TrainBatch(ArrayModel):
    """What the learner consumes: prompt+response sequences, advantages and reference log-probs.

    ``sequences`` row i is prompt_i followed by response_i; ``prompt_lengths[i]`` splits them. Per-token
    arrays (``sampler_logprobs``, ``ref_logprobs``) are flat over response tokens only, in the same
    order as the responses (row i's response tokens are sequences.row(i)[prompt_lengths[i]:]).
    """

    step: int = Field(ge=0)
    policy_version: int = Field(ge=0)
    sequences: Ragged  # [N]
    prompt_lengths: np.ndarray  # int32 [N]
    advantages: np.ndarray  # float32 [N] (outcome advantage, broadcast to tokens by the learner)
    sampler_logprobs: np.ndarray  # float32 [sum response T]
    ref_logprobs: np.ndarray | None = None  # float32 [sum response T]; None when no KL term
    loss_mask: np.ndarray | None = None  # float32 [N]: 0 drops a whole sample (e.g. overlong)
    prompt_index: np.ndarray  # int64 [N]: prompt row of each sample (for per-group statistics)

    @model_validator(mode="after")
    def _validate(self) -> TrainBatch:
        n = len(self.sequences)
        _check(self.prompt_lengths, "prompt_lengths", np.int32, 1, n)
        _check(self.advantages, "advantages", np.float32, 1, n)
        _check(self.prompt_index, "prompt_index", np.int64, 1, n)
        response_tokens = int(self.sequences.values.shape[0] - self.prompt_lengths.sum(dtype=np.int64))
        if np.any(self.prompt_lengths < 1) or np.any(self.prompt_lengths > self.sequences.lengths):
            raise ValueError("prompt_lengths must be >= 1 and <= the sequence length of each row")
        _check(self.sampler_logprobs, "sampler_logprobs", np.float32, 1, response_tokens)
        if self.ref_logprobs is not None:
            _check(self.ref_logprobs, "ref_logprobs", np.float32, 1, response_tokens)
        if self.loss_mask is not None:
            _check(self.loss_mask, "loss_mask", np.float32, 1, n)
        return self

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def response_lengths(self) -> np.ndarray:
        return (self.sequences.lengths - self.prompt_lengths).astype(np.int64)

    @property
    def response_offsets(self) -> np.ndarray:
        """Offsets of the rows' response tokens in the flat per-token arrays (``ragged_positions``)."""
        return offsets_from_lengths(self.response_lengths)


class LearnerStats(ArrayModel):
    """What a learner rank reports for one step."""

    step: int
    policy_version: int = Field(description="Version of the weights after this update.")
    rank: int = 0
    metrics: dict[str, float]
    tokens: int = Field(ge=0, description="Response tokens trained on by this rank.")
    time_s: float = Field(ge=0)
    top_tokens: list[dict[str, float]] = Field(
        default_factory=list, description="Top tokens by covariance (row, t, cov, advantage, logprob, prob)."
    )


class MetricsRecord(ArrayModel):
    """One record for the metrics actor: who sent it (role, replica, node) and stable metric names."""

    step: int = Field(ge=0)
    role: Literal["driver", "generator", "verifier", "reference", "learner", "metrics", "eval"]
    replica: int = 0
    node_id: str = ""
    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict, description="Small row tables, e.g. the high-covariance token inspector."
    )
