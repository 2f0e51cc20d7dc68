"""Generation over the generator replicas, surviving a replica dying mid-step.

A step's prompts are split by rows across the live replicas; when a replica dies (``RayActorError``)
its share — and only its share — is sampled again on a surviving replica, so no prompt is lost or
sampled twice. A dead replica is left out until it answers again: Ray restarts it (``max_restarts``)
with the initial weights, so it gets the current weights pushed before it is used (``WeightSync``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from pipeline.core.batching import concat_rollouts, split_prompts
from pipeline.driver.roles import RoleFailure, RoleGroup
from schemas.batches import PromptBatch, RolloutBatch


@dataclass
class Launched:
    """Shares of one generation request in flight: (replica index, prompt share, object ref)."""

    parts: list[tuple[int, PromptBatch, Any]]
    n: int
    kwargs: dict[str, Any]


def launch(generators: RoleGroup, prompts: PromptBatch, n: int, **kwargs: Any) -> Launched:
    """Start sampling ``n`` responses per prompt on every live replica (prompt rows split across them)."""
    live = generators.live()
    if not live:
        raise RoleFailure("generator", "no generator replica is alive")
    shares = split_prompts(prompts, len(live))
    parts = [(i, s, generators[i].generate.remote(s, n=n, **kwargs)) for i, s in zip(live, shares)]
    return Launched(parts, n, kwargs)


def gather(generators: RoleGroup, launched: Launched) -> tuple[RolloutBatch, dict[str, float]]:
    """Results in prompt order; failed shares are re-sampled on surviving replicas."""
    results: list[tuple[RolloutBatch, dict[str, float]] | None] = [None] * len(launched.parts)
    pending = list(enumerate(launched.parts))
    while pending:
        retry = []
        for slot, (idx, share, ref) in pending:
            try:
                results[slot] = ray.get(ref)
            except RayActorError:
                generators.mark_dead(idx)
                retry.append((slot, share))
        pending = []
        for slot, share in retry:
            live = generators.live()
            if not live:
                raise RoleFailure("generator", "every generator replica died during the step")
            idx = live[slot % len(live)]
            ref = generators[idx].generate.remote(share, n=launched.n, **launched.kwargs)
            pending.append((slot, (idx, share, ref)))
    outs = [r for r in results if r is not None]
    stats: dict[str, float] = {"time/generate": max(o[1]["time/generate"] for o in outs)}
    tokens = sum(o[1]["tokens"] for o in outs)
    stats["throughput/generate_tokens_per_s"] = tokens / max(stats["time/generate"], 1e-9)
    stats["generator/failures"] = float(generators.failures)
    stats["generator/live_replicas"] = float(len(generators.live()))
    return concat_rollouts([o[0] for o in outs]), stats


def generate(
    generators: RoleGroup, prompts: PromptBatch, n: int, **kwargs: Any
) -> tuple[RolloutBatch, dict[str, float]]:
    return gather(generators, launch(generators, prompts, n, **kwargs))
