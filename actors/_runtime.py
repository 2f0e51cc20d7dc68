"""Process set-up shared by every role: pinned threads and where am I running.

On 2 cores every role shares the machine, so each process pins its own torch/OpenMP threads;
otherwise generator, learner and reference oversubscribe the cores and every timing lies.
"""

from __future__ import annotations

import os
import socket


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
    return {"role": role, "replica": replica, "node_id": node_id(), "pid": os.getpid(), "host": socket.gethostname()}
