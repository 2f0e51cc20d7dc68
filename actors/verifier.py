"""The verifier role: score responses with the configured reward plug-ins, isolated, per data source.

A thin shell. Routing, the plug-in API and the statistics live in ``pipeline.data.verifiers``; the plug-ins run
in worker processes owned by ``IsolatedScorer`` (timeouts, crashes and exceptions score 0 with a reason).
The class carries no ``@ray.remote``: the driver applies ``ray.remote(num_cpus=..., ...)`` from
``config.resources``; ``pipeline.driver.verification`` splits one batch across the replicas.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from actors._runtime import where
from pipeline.data.verifiers.base import DEFAULT_ROUTE, route_key, route_specs, summarize
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
        outcomes = self._scorer.score(keys, prompts, responses, ground_truths, extras, data_sources)
        scores = np.asarray([o.score for o in outcomes], dtype=np.float32)
        stats = summarize(
            scores.tolist(),
            [o.kind for o in outcomes],
            data_sources,
            [self._names[k] for k in keys],
            [o.info for o in outcomes],
        )
        stats["verifier/worker_restarts"] = float(self._scorer.restarts - restarts)
        stats["verifier/time_s"] = time.perf_counter() - start
        return scores, [o.reason for o in outcomes], stats

    def info(self) -> dict[str, object]:
        """Where this replica runs and its isolated worker pids (readiness check, tests)."""
        return {**where("verifier", self.replica), "worker_pids": self._scorer.worker_pids()}

    def close(self) -> None:
        self._scorer.close()
