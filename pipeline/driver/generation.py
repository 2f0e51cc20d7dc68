"""The generator replicas as one pool that survives a replica dying mid-step.

A step's prompts are split by rows across the live replicas; when a replica dies (``RayActorError``)
its share — and only its share — is sampled again on a surviving replica, so no prompt is lost or
sampled twice. A dead replica is left out until it answers again: Ray restarts it (``max_restarts``)
with the initial weights, so it gets the current weights pushed before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from pipeline.core.batching import concat_rollouts, split_prompts
from schemas.batches import PromptBatch, RolloutBatch


class RoleFailure(RuntimeError):
    """A role failed in a way the step cannot absorb; names the role and the cause."""

    def __init__(self, role: str, detail: str) -> None:
        super().__init__(f"{role} failed: {detail}")
        self.role = role


@dataclass
class Launched:
    """Shares of one generation request in flight: (replica index, prompt share, object ref)."""

    parts: list[tuple[int, PromptBatch, Any]]
    n: int
    kwargs: dict[str, Any]


class GeneratorPool:
    def __init__(self, actors: list[Any]) -> None:
        self.actors = actors
        self.dead: set[int] = set()
        self.failures = 0

    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.dead]

    def launch(self, prompts: PromptBatch, n: int, **kwargs: Any) -> Launched:
        live = self.live()
        if not live:
            raise RoleFailure("generator", "no generator replica is alive")
        shares = split_prompts(prompts, len(live))
        parts = [(i, s, self.actors[i].generate.remote(s, n=n, **kwargs)) for i, s in zip(live, shares)]
        return Launched(parts, n, kwargs)

    def gather(self, launched: Launched) -> tuple[RolloutBatch, dict[str, float]]:
        """Results in prompt order; failed shares are re-sampled on surviving replicas."""
        results: list[tuple[RolloutBatch, dict[str, float]] | None] = [None] * len(launched.parts)
        pending = list(enumerate(launched.parts))
        while pending:
            retry = []
            for slot, (idx, share, ref) in pending:
                try:
                    results[slot] = ray.get(ref)
                except RayActorError:
                    self.dead.add(idx)
                    self.failures += 1
                    retry.append((slot, share))
            pending = []
            for slot, share in retry:
                live = self.live()
                if not live:
                    raise RoleFailure("generator", "every generator replica died during the step")
                idx = live[slot % len(live)]
                pending.append(
                    (
                        slot,
                        (
                            idx,
                            share,
                            self.actors[idx].generate.remote(share, n=launched.n, **launched.kwargs),
                        ),
                    )
                )
        outs = [r for r in results if r is not None]
        stats: dict[str, float] = {"time/generate": max(o[1]["time/generate"] for o in outs)}
        tokens = sum(o[1]["tokens"] for o in outs)
        stats["throughput/generate_tokens_per_s"] = tokens / max(stats["time/generate"], 1e-9)
        stats["generator/failures"] = float(self.failures)
        stats["generator/live_replicas"] = float(len(self.live()))
        return concat_rollouts([o[0] for o in outs]), stats

    def revive(self, timeout_s: float = 120.0) -> list[int]:
        """Dead replicas that answer again (restarted by Ray); the caller must push weights to them."""
        back = []
        for i in sorted(self.dead):
            try:
                ray.get(self.actors[i].info.remote(), timeout=timeout_s)
                back.append(i)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                continue
        self.dead -= set(back)
        return back
