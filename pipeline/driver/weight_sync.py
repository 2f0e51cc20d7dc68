"""New policy weights from the learner ranks into every live generator replica, versioned.

Two paths (``weight_sync.method``, docs/architecture.md): ``object_store`` (learner rank 0 puts one
object of HF-named tensors; every replica reloads it) and ``collective`` (vLLM's weight-transfer API: a
process group of the learner ranks and the replicas' workers; NCCL on GPUs, gloo on CPU). A dead or
restarted replica cannot rejoin a running collective, so this class owns the group's membership: it is
rebuilt whenever the set of live replicas changes, and once after a failed broadcast (then the send is
retried). A replica that comes back (restarted by Ray with its initial weights) gets the current ones.
"""

from __future__ import annotations

import time

import ray

from pipeline.driver.roles import Roles
from schemas.run_config import RunConfig


class WeightSync:
    def __init__(self, cfg: RunConfig, roles: Roles) -> None:
        self.cfg, self.roles = cfg, roles
        self._members: list[int] | None = None  # replicas in the collective group

    def revive_generators(self) -> bool:
        """Take back restarted replicas (they get the weights at the next ``sync``)."""
        if self.roles.generators.dead and self.roles.generators.revive(timeout_s=5.0):
            print("  generator replica restarted: pushing current weights to it", flush=True)
            self._members = None  # a restarted process is not in the old collective group
            return True
        return False

    def sync(self, version: int) -> float:
        """Send the learner's current weights as ``version``; returns the seconds it took."""
        if self.cfg.weight_sync.method == "collective":
            return self._sync_collective(version)
        t0 = time.perf_counter()
        learners, gens = self.roles.learners, self.roles.generators
        weights = learners[0].get_weights.remote()
        if self.cfg.learner.zero_stage == 3:  # every rank joins the gather; rank 0 returns the weights
            learners.get([lr.get_weights.remote() for lr in learners.actors[1:]])
        try:
            ray.get(gens.map(lambda g: g.load_weights.remote(weights, version)))
        except ray.exceptions.RayActorError:
            # A replica died while loading: it is left out and revived (with weights) later.
            gens.mark_unresponsive()
        return time.perf_counter() - t0

    def _sync_collective(self, version: int) -> float:
        t0 = time.perf_counter()
        gens = self.roles.generators
        for attempt in (1, 2):
            live = gens.live()
            if self._members != live:
                self._build_group(live)
            try:
                ray.get(self.roles.learners.map(lambda lr: lr.send_weights.remote(version)))
                break
            except ray.exceptions.RayError:
                self._members = None
                # a survivor may still sit in its receive until the group's timeout: busy is not dead
                gens.mark_unresponsive(timeout_s=self.cfg.weight_sync.timeout_s + 10)
                if attempt == 2:
                    raise
        return time.perf_counter() - t0

    def _build_group(self, live: list[int]) -> None:
        tp = self.cfg.generator.tensor_parallel_size
        gens = [self.roles.generators[i] for i in live]
        offsets = [1 + k * tp for k in range(len(live))]
        world = 1 + len(live) * tp
        sync_cfg = self.cfg.weight_sync
        self.roles.learners.call(lambda lr: lr.init_weight_transfer.remote(gens, offsets, world, sync_cfg))
        self._members = live
