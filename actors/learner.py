"""Learner role: one DeepSpeed engine per data-parallel rank (one Ray actor per rank).

The only module that imports DeepSpeed. The update itself is ``pipeline.core.ppo_update`` (engine
agnostic); this shell owns process-group set-up (gloo on CPU, NCCL on GPU), the engine, checkpoints
and handing weights to the generators.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from actors._runtime import MetricsClient, pin_threads, where
from schemas.batches import LearnerStats, TrainBatch

if TYPE_CHECKING:
    from schemas.run_config import AlgorithmConfig, LearnerConfig, WeightSyncConfig


class LearnerStartError(RuntimeError):
    """The learner could not start; the message names what it waited for and how to fix it."""


def _lock_message(path: str, waited_s: float) -> str:
    # One line: Ray's RoleStartError quotes the last line of the actor's traceback.
    return (
        f"learner: waited {waited_s:.0f} s (learner.start_timeout_s) for the build lock {path} of a "
        "JIT-compiled extension (DeepSpeed's CPU communication op). Either another process is building it "
        "(let it finish, or raise learner.start_timeout_s), or a start was killed mid-build and left the "
        f"lock behind: then remove it (rm {path}) and build the op once with `bash scripts/setup.sh`"
    )


@contextlib.contextmanager
def bounded_build_locks(timeout_s: float) -> Iterator[None]:
    """Within this block, waiting for a torch JIT-extension build lock gives up after ``timeout_s``.

    torch's ``FileBaton.wait`` polls the lock file forever, and a build killed mid-way leaves that file
    behind, so every later learner would hang silently in ``__init__``. The lock is never removed here:
    it may belong to a live build in another process (or on another node sharing the folder).
    """
    from torch.utils.file_baton import FileBaton

    unbounded = FileBaton.wait

    def wait(baton: FileBaton) -> None:
        start = time.monotonic()
        while os.path.exists(baton.lock_file_path):
            if time.monotonic() - start >= timeout_s:
                raise LearnerStartError(_lock_message(baton.lock_file_path, timeout_s))
            time.sleep(baton.wait_seconds)

    FileBaton.wait = wait
    try:
        yield
    finally:
        FileBaton.wait = unbounded


def build_comm_op(timeout_s: float = 600.0) -> str | None:
    """Compile (or find compiled) DeepSpeed's CPU shared-memory communication op, as ``scripts/setup.sh``
    does, so no learner compiles it at start. Returns the built library's path; None where DeepSpeed uses
    no such op (e.g. GPU accelerators)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    with bounded_build_locks(timeout_s):
        return builder.load().__file__


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    """DeepSpeed JSON config from our LearnerConfig. Gradient accumulation is unmanaged: the update
    loop decides where a mini-batch ends (``step()``), so micro-batch counts may vary per step."""
    import torch

    cpu = not torch.cuda.is_available()
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": cfg.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "torch_adam": cpu,
                # torch.optim.AdamW's own switch, passed through by DeepSpeed (its CUDA FusedAdam needs none)
                **({"fused": True} if cfg.fused_optimizer and cpu else {}),
            },
        },
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.warmup_steps:
        conf["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": cfg.warmup_steps,
                "warmup_type": "linear",
            },
        }
    return conf


#: DeepSpeed's default gradient-reduction bucket (``zero_optimization.reduce_bucket_size``, elements); the
#: learner keeps the default.
REDUCE_BUCKET = 500_000_000


def model_states_bytes(
    total_params: int,
    largest_layer_params: int,
    *,
    zero_stage: int,
    ranks: int,
    ranks_per_node: int,
    dtype: str,
) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients and optimizer state (AdamW), from DeepSpeed's own estimators
    (no offload): ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``.

    Those assume 16-bit parameters and gradients with fp32 master weights and Adam moments. Adjusted for what
    they do not cover: ZeRO-1 keeps every gradient (DeepSpeed has no stage-1 estimator), fp32 training keeps
    4-byte parameters and gradients, and stages 1-2 reduce gradients through a bucket of up to
    ``REDUCE_BUCKET`` elements."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = -(-ranks // ranks_per_node)
    per_node = min(ranks, ranks_per_node)
    total_gpus = nodes * per_node
    p = total_params
    out: dict[str, int] = {}
    if zero_stage == 3:
        _, states, _ = estimate_zero3_model_states_mem_needs(
            p, largest_layer_params, per_node, nodes, cpu_offload=False, cpu_offload_params=False
        )
        out["deepspeed"] = int(states)
        if dtype == "float32":
            out["fp32 parameters and gradients"] = 4 * p // total_gpus
    else:
        _, states = estimate_zero2_model_states_mem_needs(p, per_node, nodes, cpu_offload=False)
        out["deepspeed"] = int(states)
        if zero_stage == 1:
            out["unpartitioned gradients (ZeRO-1)"] = 2 * p - 2 * p // total_gpus
        if dtype == "float32":
            out["fp32 parameters and gradients"] = 2 * p + (2 * p if zero_stage == 1 else 2 * p // total_gpus)
        # ZeRO-2's gradients live in the bucket (contiguous_gradients): it only adds what exceeds the rank's own
        # gradient partition. ZeRO-1 stages them in fp32 besides the 16-bit gradients.
        bucket = min(REDUCE_BUCKET, p)
        extra = (
            bucket * 4 if zero_stage == 1 else (bucket - p // total_gpus) * (4 if dtype == "float32" else 2)
        )
        if extra > 0:
            out["reduction bucket"] = extra
    return out


class _EngineTrainable:
    """Adapter from a DeepSpeed engine to pipeline.core.ppo_update's Trainable protocol."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.module = engine, engine.module

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float | None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


class Learner:
    """One data-parallel rank. All ranks receive the same TrainBatch reference and shard it themselves."""

    def __init__(
        self,
        cfg: LearnerConfig,
        algo: AlgorithmConfig,
        model_path: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        seed: int = 0,
        temperature: float = 1.0,
        metrics_actor: str | None = None,
        core_share: str | None = None,
    ) -> None:
        pin_threads(cfg.threads)
        self.metrics = MetricsClient(metrics_actor, "learner", rank)
        import torch

        gpu = torch.cuda.is_available()
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0" if gpu else str(rank),
        )
        import deepspeed
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.cfg, self.algo, self.rank, self.world_size = cfg, algo, rank, world_size
        self.seed, self.temperature, self.version = seed, temperature, 0
        with bounded_build_locks(cfg.start_timeout_s):  # DeepSpeed may JIT-build ops in both calls
            deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            if cfg.gradient_checkpointing:
                from pipeline.core.model_forward import enable_gradient_checkpointing

                enable_gradient_checkpointing(model)
            self.engine, *_ = deepspeed.initialize(
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                config=deepspeed_config(cfg),
            )
        self._deepspeed = deepspeed
        self.governor = None  # lends cores to a co-located generator (async mode, actors/core_share.py)
        twg = cfg.threads_while_generating
        if core_share and twg is not None and twg < cfg.threads:
            from actors.core_share import ThreadGovernor

            self.governor = ThreadGovernor(core_share, threads=cfg.threads, threads_while_generating=twg)
            self.governor.attach(self.engine.module)

    def info(self) -> dict[str, object]:
        return where("learner", self.rank) | {"policy_version": self.version}

    def _all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        if self.world_size == 1:
            return [x]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, x)
        return out

    def train_step(
        self,
        batch: TrainBatch,
        *,
        step: int,
        measure_entropy_change: bool = False,
        inspect_top_k: int = 0,
        loss_overrides: dict[str, float] | None = None,
        old_logprobs_from_sampler: bool = False,
        entropy_probe: bool = False,
    ) -> LearnerStats:
        """One RL step on this rank's share. ``loss_overrides`` (the entropy controller's knob) replaces
        policy-loss fields for this step; ``old_logprobs_from_sampler`` uses vLLM's log-probs as the
        PPO "old" policy (one-step-async mode, where the sampler's weights are a version behind);
        ``entropy_probe`` runs the SGD entropy probe (``learner.entropy_probe``) before the update."""
        from pipeline.core.ppo_update import ppo_update

        t0 = time.perf_counter()
        algo = self.algo
        if loss_overrides:
            from pipeline.core.entropy_control import apply_overrides

            algo = algo.model_copy(update={"policy_loss": apply_overrides(algo.policy_loss, loss_overrides)})
        result = ppo_update(
            _EngineTrainable(self.engine),
            batch,
            algo=algo,
            learner=self.cfg,
            temperature=self.temperature,
            seed=self.seed * 1_000_003 + step,
            rank=self.rank,
            world_size=self.world_size,
            all_gather=self._all_gather,
            measure_entropy_change=measure_entropy_change,
            inspect_top_k=inspect_top_k if self.rank == 0 else 0,
            old_logprobs_from_sampler=old_logprobs_from_sampler,
            full_logits=self.cfg.zero_stage == 3,
            entropy_probe_lrs=self.cfg.entropy_probe.lrs if entropy_probe else (),
        )
        metrics = result.metrics
        self.version += 1
        seconds = time.perf_counter() - t0
        tokens = int(batch.response_lengths.sum())
        metrics["time/learner"] = seconds
        metrics["throughput/learner_tokens_per_s"] = tokens / seconds
        metrics["actor/lr"] = float(self.engine.get_lr()[0])
        if self.governor is not None:
            metrics["time/learner_cores_lent"] = self.governor.end_step()
        self.metrics.send(
            step, {f"learner/{self.rank}/time": seconds, f"learner/{self.rank}/tokens": float(tokens)}
        )
        return LearnerStats(
            step=step,
            policy_version=self.version,
            rank=self.rank,
            metrics=metrics,
            tokens=tokens,
            time_s=seconds,
            top_tokens=result.top_tokens,
        )

    def get_weights(self) -> list[tuple[str, np.ndarray]] | None:
        """HF-named fp32 weights for the generators (rank 0). Under ZeRO-3 every rank must call it:
        parameters are gathered collectively first."""
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            with self._deepspeed.zero.GatheredParameters(list(module.parameters())):
                named = _to_numpy(module) if self.rank == 0 else None
            return named
        return _to_numpy(module) if self.rank == 0 else None

    def init_weight_transfer(
        self, generators: list[Any], rank_offsets: list[int], world_size: int, sync: WeightSyncConfig
    ) -> None:
        """Join (every rank) the collective weight-transfer group with the generator replicas; rank 0
        hosts the rendezvous and drives the replicas (``weight_sync.method: collective``)."""
        from actors.weight_transfer import start_trainer_transfer

        self.shutdown_weight_transfer()
        zero3 = self.cfg.zero_stage == 3
        self._transfer = start_trainer_transfer(
            self.engine.module,
            gather=self._deepspeed.zero.GatheredParameters if zero3 else None,
            generators=generators,
            rank_offsets=rank_offsets,
            world_size=world_size,
            rank=self.rank,
            sync=sync,
        )

    def send_weights(self, version: int) -> float:
        """Broadcast the current weights to every replica of the group (all ranks call it)."""
        if getattr(self, "_transfer", None) is None:
            raise RuntimeError("send_weights before init_weight_transfer")
        t0 = time.perf_counter()
        self._transfer.client.version = version
        self._transfer.send_weights()
        return time.perf_counter() - t0

    def shutdown_weight_transfer(self) -> None:
        transfer, self._transfer = getattr(self, "_transfer", None), None
        if transfer is not None:
            transfer.shutdown()

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        self.engine.save_checkpoint(save_dir, tag=tag, client_state={"policy_version": self.version})

    def load_checkpoint(self, load_dir: str, tag: str) -> int:
        _, client = self.engine.load_checkpoint(load_dir, tag=tag)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' under {load_dir}")
        self.version = int(client.get("policy_version", 0))
        return self.version


def _to_numpy(module) -> list[tuple[str, np.ndarray]]:
    """HF-named fp32 arrays of the whole state dict. Tied tensors (LM head = embeddings) are sent under both
    names on purpose: vLLM's CPU backend keeps its own (repacked) LM-head weight, which goes stale when the
    duplicate is skipped (tests/e2e/test_pipeline_e2e.py compares log-probs after a sync)."""
    return [(name, t.detach().float().cpu().numpy()) for name, t in module.state_dict().items()]
