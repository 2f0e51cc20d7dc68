"""Reference role: the frozen initial policy, giving per-token reference log-probs for the KL term.

Started only when a KL coefficient is > 0 (``RunConfig.use_reference``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from actors._runtime import MetricsClient, pin_threads, where
from schemas.batches import TrainBatch

if TYPE_CHECKING:
    from schemas.run_config import ReferenceConfig


class Reference:
    def __init__(
        self,
        cfg: ReferenceConfig,
        model_path: str,
        *,
        replica: int = 0,
        temperature: float = 1.0,
        metrics_actor: str | None = None,
    ) -> None:
        pin_threads(cfg.threads)
        self.metrics = MetricsClient(metrics_actor, "reference", replica)
        import torch
        from transformers import AutoModelForCausalLM

        self.cfg, self.replica, self.temperature = cfg, replica, temperature
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def info(self) -> dict[str, object]:
        return where("reference", self.replica)

    def logprobs(
        self, batch: TrainBatch, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Flat float32 reference log-probs over the response tokens of ``rows`` (others left 0)."""
        from pipeline.core.model_forward import batch_logprobs

        t0 = time.perf_counter()
        rows = np.arange(len(batch)) if rows is None else rows
        logp, _ = batch_logprobs(
            self.model,
            batch,
            rows,
            micro_batch_size=self.cfg.micro_batch_size,
            temperature=self.temperature,
            with_entropy=False,
        )
        seconds = time.perf_counter() - t0
        self.metrics.send(batch.step, {f"reference/{self.replica}/time": seconds})
        return logp, {"time/reference": seconds}
