"""Process set-up shared by every role: pinned threads and where am I running.

On 2 cores every role shares the machine, so each process pins its own torch/OpenMP threads;
otherwise generator, learner and reference oversubscribe the cores and every timing lies.
"""

from __future__ import annotations

import os
import socket
import time


def pin_threads(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    import torch

    torch.set_num_threads(threads)


def node_id() -> str:
    """Ray node id when inside Ray, else the host name (so records are always tagged)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - tagging must never break a role
        pass
    return socket.gethostname()


def where(role: str, replica: int) -> dict[str, object]:
    return {
        "role": role,
        "replica": replica,
        "node_id": node_id(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


class MetricsClient:
    """Sends a role's own MetricsRecord (tagged with its node) to the named metrics actor.

    The send waits for the actor to take the record (~1 ms), so a step's records are all in before
    the driver flushes that step: no record is attributed to the wrong step.
    """

    def __init__(self, actor_name: str | None, role: str, replica: int) -> None:
        self.actor_name, self.role, self.replica = actor_name, role, replica
        self._handle = None
        self._node = node_id()

    def send(self, step: int, metrics: dict[str, float], tables: dict | None = None) -> None:
        if self.actor_name is None:
            return
        import ray

        from schemas.batches import MetricsRecord

        if self._handle is None:
            self._handle = ray.get_actor(self.actor_name)
        metrics = metrics | {
            f"{self.role}/{self.replica}/rss_mb": rss_mb(),
            f"{self.role}/{self.replica}/rss_peak_mb": peak_rss_mb(),
            # CPU seconds this process has used so far, all threads: per-step differences tell a role's
            # work apart from the waiting that a shared machine adds to its wall time
            f"{self.role}/{self.replica}/cpu_s": time.process_time(),
        }
        rec = MetricsRecord(
            step=step,
            role=self.role,
            replica=self.replica,
            node_id=self._node,
            metrics=metrics,
            tables=tables or {},
        )
        ray.get(self._handle.record.remote(rec))


def rss_mb() -> float:
    """Resident memory of this process (the soak test checks it stays flat)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """High-water resident memory of this process so far: the current RSS sampled once per step misses
    the peaks inside a step (the learner's activations, the generator's KV cache fill)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
