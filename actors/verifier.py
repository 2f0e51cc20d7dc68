"""The verifier role: score responses with the configured reward plug-ins, isolated, per data source.

A thin shell. Routing, the plug-in API and the statistics live in ``pipeline.data.verifiers``; the plug-ins run
in worker processes owned by ``IsolatedScorer`` (timeouts, crashes and exceptions score 0 with a reason).
The class carries no ``@ray.remote``: the driver applies ``ray.remote(num_cpus=..., ...)`` from
``config.resources``. ``score_with_pool`` splits one batch across several such actors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors._runtime import where
from pipeline.data.verifiers.base import DEFAULT_ROUTE, ERROR, merge_stats, route_key, route_specs, summarize
from pipeline.data.verifiers.isolation import IsolatedScorer
from schemas.verifier_config import VerifierConfig

ScoreResult = tuple[np.ndarray, list[str | None], dict[str, float]]  # float32 [N], [N], stable-named stats


class VerifierWorker:
    """One verifier replica. ``score`` never raises for anything a plug-in does."""

    def __init__(self, config: VerifierConfig, replica: int = 0):
        self.config, self.replica = config, replica
        specs = route_specs(config)
        # Metric names use the configured verifier, not the format wrapper around it.
        base = {**config.routes, DEFAULT_ROUTE: config.default}
        self._names = {key: spec.name for key, spec in base.items()}
        self._scorer = IsolatedScorer(specs, timeout_s=config.timeout_s, workers=config.workers_per_replica)

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        ground_truths: Sequence[str],
        data_sources: Sequence[str],
        extras: Sequence[dict[str, Any]] | None = None,
    ) -> ScoreResult:
        """Scores (float32 [N]), reasons ([N], None = nothing to say) and ``verifier/...`` stats."""
        if len(data_sources) != len(responses):
            raise ValueError(f"score: {len(data_sources)} data_sources for {len(responses)} responses")
        start, restarts = time.perf_counter(), self._scorer.restarts
        keys = [route_key(s, self.config.routes) for s in data_sources]
        outcomes = self._scorer.score(keys, prompts, responses, ground_truths, extras)
        scores = np.asarray([o.score for o in outcomes], dtype=np.float32)
        stats = summarize(
            scores.tolist(), [o.kind for o in outcomes], data_sources, [self._names[k] for k in keys]
        )
        stats["verifier/worker_restarts"] = float(self._scorer.restarts - restarts)
        stats["verifier/time_s"] = time.perf_counter() - start
        return scores, [o.reason for o in outcomes], stats

    def ping(self) -> dict[str, object]:
        """Where this replica runs and its isolated worker pids (readiness check, tests)."""
        return {**where("verifier", self.replica), "worker_pids": self._scorer.worker_pids()}

    info = ping  # the spelling the other roles use

    def close(self) -> None:
        self._scorer.close()


VerifierActor = VerifierWorker


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
    actors: Sequence[Any],
    prompts: Sequence[str],
    responses: Sequence[str],
    ground_truths: Sequence[str],
    data_sources: Sequence[str],
    extras: Sequence[dict[str, Any]] | None = None,
) -> ScoreResult:
    """Score one batch on M verifier actors concurrently and reassemble it in order.

    Launches every chunk, then one ``ray.get``. A chunk whose actor died (``RayActorError``) is re-split
    over the surviving actors; when none survive its samples score 0 with the reason. Each sample is
    scored exactly once: a failed chunk produced no results, so re-scoring it double-counts nothing.
    """
    import ray
    from ray.exceptions import RayActorError

    n = len(responses)
    extras = list(extras) if extras is not None else [{} for _ in range(n)]
    cols = (list(prompts), list(responses), list(ground_truths), list(data_sources), extras)
    scores = np.zeros(n, dtype=np.float32)
    reasons: list[str | None] = [None] * n
    parts: list[dict[str, float]] = []
    alive, todo, failures = list(actors), [(0, n)] if n else [], 0
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
    import ray

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
