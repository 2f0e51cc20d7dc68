"""Scoring one batch on the verifier replicas, concurrently, reassembled in order.

A chunk whose replica died (``RayActorError``) is re-split over the surviving replicas; when none
survive its samples score 0 with the reason. Each sample is scored exactly once: a failed chunk produced
no results, so re-scoring it double-counts nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from pipeline.data.verifiers.base import ERROR, merge_stats, summarize
from pipeline.driver.roles import RoleGroup
from schemas.batches import RolloutBatch, ScoredBatch

ScoreResult = tuple[np.ndarray, list[str | None], dict[str, float]]  # float32 [N], [N], stable-named stats


def score_rollout(verifiers: RoleGroup, rollout: RolloutBatch) -> ScoredBatch:
    """The verifier pool's scores of every response of ``rollout`` (each against its prompt's truth)."""
    p_idx = rollout.prompt_index
    prompts = rollout.prompts
    t0 = time.perf_counter()
    scores, reasons, stats = score_with_pool(
        verifiers,
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


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, balanced [start, end) ranges; e.g. n=5, parts=2 -> [(0, 3), (3, 5)]."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for p in range(parts):
        end = start + base + (p < extra)
        bounds.append((start, end))
        start = end
    return [b for b in bounds if b[1] > b[0]]


def score_with_pool(
    verifiers: RoleGroup | Sequence[Any],
    prompts: Sequence[str],
    responses: Sequence[str],
    ground_truths: Sequence[str],
    data_sources: Sequence[str],
    extras: Sequence[dict[str, Any]] | None = None,
) -> ScoreResult:
    """Score one batch on the verifier replicas concurrently (launch every chunk, then one ``ray.get``)."""
    n = len(responses)
    extras = list(extras) if extras is not None else [{} for _ in range(n)]
    cols = (list(prompts), list(responses), list(ground_truths), list(data_sources), extras)
    scores = np.zeros(n, dtype=np.float32)
    reasons: list[str | None] = [None] * n
    parts: list[dict[str, float]] = []
    actors = [verifiers[i] for i in verifiers.live()] if isinstance(verifiers, RoleGroup) else list(verifiers)
    alive, todo, failures = actors, [(0, n)] if n else [], 0
    while todo:
        if not alive:
            for start, end in todo:
                reasons[start:end] = ["error: no verifier actor left alive"] * (end - start)
                parts.append(_dead_stats(data_sources[start:end]))
            break
        launches = []
        for start, end in todo:
            for i, (s, e) in enumerate(_split(end - start, len(alive))):
                actor = alive[i]
                launches.append(
                    (
                        actor,
                        start + s,
                        start + e,
                        actor.score.remote(*(c[start + s : start + e] for c in cols)),
                    )
                )
        try:
            outs = ray.get([ref for *_, ref in launches])
            failed: list[tuple[Any, int, int]] = []
        except RayActorError:
            outs, failed = _get_each(launches, RayActorError)
        for (_, start, end, _ref), out in zip(launches, outs):
            if out is not None:
                scores[start:end], reasons[start:end] = out[0], out[1]
                parts.append(out[2])
        dead = {id(actor) for actor, *_ in failed}
        failures += len(dead)
        alive = [a for a in alive if id(a) not in dead]
        todo = [(start, end) for _, start, end in failed]
    stats = merge_stats(parts)
    stats["verifier/actor_failures"] = float(failures)
    return scores, reasons, stats


def _get_each(launches: list[tuple[Any, int, int, Any]], error: type[BaseException]) -> tuple[list, list]:
    """Results one by one after a batch get failed; None where the actor died."""
    outs, failed = [], []
    for actor, start, end, ref in launches:
        try:
            outs.append(ray.get(ref))
        except error:
            outs.append(None)
            failed.append((actor, start, end))
    return outs, failed


def _dead_stats(data_sources: Sequence[str]) -> dict[str, float]:
    k = len(data_sources)
    return summarize([0.0] * k, [ERROR] * k, data_sources, ["unavailable"] * k)
