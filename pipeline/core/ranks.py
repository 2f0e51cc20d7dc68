"""What one data-parallel rank of the update needs to cooperate with the others, engine-agnostic.

``Trainable`` is the learner's engine as the update sees it (a DeepSpeed engine wrapper in the learner;
a plain optimizer in tests), ``AllGather`` the rank group's all-gather (``all_gather_object``; a list of
one in a single process). Rows are split contiguously across ranks (``shard``); per-token values travel
as flat arrays in the batch's response-token layout (``flat_positions``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from schemas.batches import TrainBatch, ragged_positions

AllGather = Callable[[Any], list[Any]]  # every rank's object, in rank order (all_gather_object)


class Trainable(Protocol):
    module: torch.nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float | None: ...


def single_process_gather(x: Any) -> list[Any]:
    return [x]


def shard(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    return np.array_split(rows, world_size)[rank]


def flat_positions(batch: TrainBatch, rows: np.ndarray) -> np.ndarray:
    """Positions of ``rows``' response tokens in the batch's flat per-token arrays, row by row."""
    return ragged_positions(batch.response_offsets, rows)


def concat_gathered(gather: AllGather, *arrays: np.ndarray) -> list[np.ndarray]:
    """All-gather several same-length flat arrays in one call; concatenated in rank order."""
    parts = gather(np.stack(arrays) if arrays[0].size else np.zeros((len(arrays), 0), np.float32))
    return list(np.concatenate(parts, axis=1))


class Accumulator:
    """Token-weighted means of per-micro-batch stats."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, stats: dict[str, torch.Tensor | float], weight: float) -> None:
        self.weight += weight
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight

    def global_means(self, gather: AllGather, prefix: str = "") -> dict[str, float]:
        """Means over every rank's micro-batches (so every rank reports the same numbers)."""
        parts = gather((self.sums, self.weight))
        weight = sum(w for _, w in parts)
        sums: dict[str, float] = {}
        for part, _ in parts:
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
        return {prefix + k: v / max(weight, 1e-12) for k, v in sums.items()}


def gather_full(gather: AllGather, batch: TrainBatch, own: np.ndarray, *values: np.ndarray):
    """Each rank holds ``values`` at flat positions ``own``; returns full flat arrays on every rank."""
    gathered = concat_gathered(gather, own.astype(np.float64), *[v.astype(np.float64) for v in values])
    positions = gathered[0].astype(np.int64)
    out = []
    for g in gathered[1:]:
        full = np.zeros(int(batch.response_lengths.sum()), dtype=np.float32)
        full[positions] = g
        out.append(full)
    return out
