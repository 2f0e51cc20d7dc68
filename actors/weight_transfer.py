"""Collective weight sync (``weight_sync.method: collective``) through vLLM's weight-transfer API.

Why: the object-store path moves a full fp32 state dict through Ray (~30 GB per step for a 7B model).
vLLM's weight-transfer protocol (init -> start -> update -> finish) instead broadcasts the weights
from learner rank 0 straight into every generator worker over a process group. On GPUs covrl uses
vLLM's own ``nccl`` engine; on CPU it registers the ``gloo`` engine defined here, which speaks the same
protocol over a stateless torch gloo group, so CI runs the very code path a GPU cluster runs (only the
transport differs).

Pieces, each small:
- ``plan_buckets``: pure; both ends cut the parameter stream into the same flat buckets.
- ``GlooWeightTransferEngine`` / ``GlooTrainerWeightTransferEngine``: the gloo backend, registered with
  vLLM's two factories by ``register_gloo_backend`` (idempotent; must run in the generator process
  before ``vllm.LLM`` is built, which is what ``actors.generator`` does).
- ``LearnerWeightSource``: the DeepSpeed module as a ``WeightSource`` (ZeRO-3 gathers one parameter
  at a time on every rank; tied LM-head weights are sent under both names, see ``actors.learner``).
- ``GeneratorClient``: drives covrl's ``Generator`` actors; gives every replica its own rank offset
  (vLLM's clients assume one engine with data-parallel ranks, covrl runs independent replicas).
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

GLOO = "gloo"


def resolve_backend(backend: str) -> str:
    """``auto`` -> nccl where this process sees a GPU, gloo otherwise."""
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() else GLOO


def resolve_wire_dtype(wire_dtype: str) -> torch.dtype:
    if wire_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, wire_dtype)


def plan_buckets(nbytes: Sequence[int], dtypes: Sequence[str], bucket_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices grouped into flat buckets: one dtype per bucket, at most
    ``bucket_bytes`` unless a single parameter is larger (it then travels alone). Sender and receivers
    call this on the same metadata, so they agree on every boundary without exchanging it."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[list[int]] = []
    size, dtype = 0, None
    for i, (n, dt) in enumerate(zip(nbytes, dtypes, strict=True)):
        if buckets and dt == dtype and size + n <= bucket_bytes:
            buckets[-1].append(i)
            size += n
        else:
            buckets.append([i])
            size, dtype = n, dt
    return buckets


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _bucket_plan(names: list[str], dtype_names: list[str], shapes: list[list[int]], bucket_bytes: int):
    sizes = [
        _numel(s) * torch.empty((), dtype=getattr(torch, d)).element_size()
        for s, d in zip(shapes, dtype_names)
    ]
    return plan_buckets(sizes, dtype_names, bucket_bytes)


def gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A stateless gloo process group (no global torch.distributed state: the learner's DeepSpeed group
    and this one coexist). Rank 0 hosts the rendezvous store."""
    from torch._C._distributed_c10d import ProcessGroupGloo
    from torch.distributed import PrefixStore, TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    # The rendezvous waits twice as long as a collective: after a failed round a surviving peer may still
    # sit in its receive until that times out, and must then still find the new group open.
    store = TCPStore(
        address, port, world_size, is_master=rank == 0, timeout=2 * timeout, wait_for_workers=False
    )
    return ProcessGroupGloo(PrefixStore("covrl-weights", store), rank, world_size, timeout)


def release_group(group) -> None:
    """Destroy a gloo group now: its sockets close, so peers blocked in a collective fail at once (a mere
    ``shutdown()``/``abort()`` leaves them waiting for the timeout; measured)."""
    import gc

    del group
    gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- gloo backend


@dataclass
class _GlooRendezvous:
    """Where rank 0's store listens, the group size, and the wire params both ends must share."""

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int = 256 << 20
    timeout_s: float = 600.0


@dataclass
class GlooWeightTransferInitInfo(_GlooRendezvous, WeightTransferInitInfo):
    """Worker side: the rendezvous plus this replica's first rank in the group."""

    rank_offset: int = field(default=1, kw_only=True)


@dataclass
class GlooTrainerInitInfo(_GlooRendezvous, TrainerInitInfo):
    backend: ClassVar[str] = GLOO


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


class GlooWeightTransferEngine(
    WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]
):
    """Inference-worker end: receives bucketed broadcasts from rank 0 and loads them through the model's
    ``load_weights`` inside vLLM's layerwise-reload lifecycle (same as the NCCL engine), so post-load
    processing (e.g. the CPU backend's repacked LM head) is redone."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.bucket_bytes = 256 << 20

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.bucket_bytes = init_info.bucket_bytes
        self.group = gloo_group(
            init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronizes an accelerator after receiving; gloo's wait() already has.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialized: call init_weight_transfer_engine first")
        names, dtypes, shapes = update_info.names, update_info.dtype_names, update_info.shapes
        for bucket in _bucket_plan(names, dtypes, shapes, self.bucket_bytes):
            numels = [_numel(shapes[i]) for i in bucket]
            flat = torch.empty(sum(numels), dtype=getattr(torch, dtypes[bucket[0]]))
            self.group.broadcast(flat, 0).wait()
            parts = flat.split(numels)
            self.model.load_weights([(names[i], p.view(shapes[i])) for i, p in zip(bucket, parts)])

    def shutdown(self) -> None:
        group, self.group = self.group, None
        release_group(group)


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer end. Rank 0 hosts the store, drives the workers through the client and broadcasts;
    other trainer ranks only iterate the source (ZeRO-3's per-parameter gather is a collective)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool, bucket_bytes: int) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(
            client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes
        )
        if not engine.is_sender:
            return engine
        worker = GlooWeightTransferInitInfo(
            master_address=init_info.master_address,
            master_port=init_info.master_port,
            rank_offset=1,
            world_size=init_info.world_size,
            bucket_bytes=init_info.bucket_bytes,
            timeout_s=init_info.timeout_s,
        )
        # Workers block in the rendezvous inside init_weight_transfer_engine: run it beside ours.
        exe = ThreadPoolExecutor(max_workers=1)
        future = exe.submit(client.init_weight_transfer_engine, asdict(worker))
        try:
            engine.group = gloo_group(
                init_info.master_address, init_info.master_port, 0, init_info.world_size, init_info.timeout_s
            )
        except Exception as e:
            # A worker that failed to join is the cause worth reporting, not the rendezvous timeout.
            if future.done() and future.exception() is not None:
                raise RuntimeError(
                    f"a generator failed to join the weight-transfer group: {future.exception()}"
                ) from e
            raise
        finally:
            exe.shutdown(wait=False)
        future.result()
        return engine

    def send_weights(self) -> None:
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        info = GlooWeightTransferUpdateInfo(
            names=[m.name for m in meta],
            dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
            shapes=[list(m.shape) for m in meta],
        )
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            self.client.start_weight_update()
            future = exe.submit(self.client.update_weights, asdict(info))
            self._broadcast(info)
            future.result()
            self.client.finish_weight_update()
        except BaseException:
            # Drop the group now: its sockets close, so receivers still waiting in this round fail at
            # once instead of at the timeout, and the caller can rebuild the group (actors.learner).
            self.shutdown()
            raise
        finally:
            exe.shutdown(wait=False)  # never join a receiver stuck in a dead collective

    def _broadcast(self, info: GlooWeightTransferUpdateInfo) -> None:
        stream = iter(self.source)
        for bucket in _bucket_plan(info.names, info.dtype_names, info.shapes, self.bucket_bytes):
            parts = []
            for i in bucket:
                name, tensor = next(stream)
                if name != info.names[i] or list(tensor.shape) != info.shapes[i]:
                    raise ValueError(
                        f"weight source disagrees with its metadata at #{i}: declared {info.names[i]} "
                        f"{info.shapes[i]}, got {name} {list(tensor.shape)}"
                    )
                parts.append(tensor.reshape(-1))
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
            self.group.broadcast(flat, 0).wait()

    def shutdown(self) -> None:
        group, self.group = self.group, None
        release_group(group)


def register_gloo_backend() -> None:
    """Make ``WeightTransferConfig(backend="gloo")`` and ``GlooTrainerInitInfo`` known to vLLM (idempotent)."""
    if GLOO not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO, GlooWeightTransferEngine)
    if GLOO not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(GLOO, GlooTrainerWeightTransferEngine)


# ------------------------------------------------------------------------------- covrl's two ends


class LearnerWeightSource(WeightSource):
    """The learner's HF-named weights in the generators' dtype, re-iterable every round.

    Under ZeRO-3 (``gather`` given: the learner's ``deepspeed.zero.GatheredParameters``, so this module
    needs no DeepSpeed import) each parameter is gathered on every rank in the same order (a collective),
    so peak extra memory is one parameter, not the model."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        wire_dtype: torch.dtype,
        gather: Callable[[list[torch.Tensor]], AbstractContextManager] | None = None,
    ) -> None:
        self.module, self.gather, self.wire_dtype = module, gather, wire_dtype
        self.names = list(module.state_dict().keys())

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self.module.get_parameter(name)
        except AttributeError:
            return self.module.get_buffer(name)

    def metadata(self) -> list[ParamMeta]:
        out = []
        for name in self.names:
            t = self._tensor(name)
            shape = tuple(getattr(t, "ds_shape", t.shape))
            out.append(ParamMeta(name, self.wire_dtype, tuple(int(d) for d in shape)))
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            t = self._tensor(name)
            if self.gather is not None and hasattr(t, "ds_id"):
                with self.gather([t]):
                    yield name, t.detach().to(self.wire_dtype, copy=True)
            else:
                yield name, t.detach().to(self.wire_dtype)


class GeneratorClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over covrl ``Generator`` actors: fans every phase out to
    all replicas and blocks; replica ``k`` gets ranks from ``rank_offsets[k]``. ``version`` is stamped on
    the replicas when an update finishes (the object-store path's ``load_weights(…, version)``)."""

    def __init__(self, handles: list[Any], rank_offsets: list[int]) -> None:
        if len(handles) != len(rank_offsets):
            raise ValueError("one rank offset per generator replica")
        self.handles, self.rank_offsets, self.version = handles, rank_offsets, 0

    def _all(self, calls: list[Any]) -> None:
        import ray

        ray.get(calls)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all(
            [
                h.init_weight_transfer.remote(init_info | {"rank_offset": off})
                for h, off in zip(self.handles, self.rank_offsets)
            ]
        )

    def start_weight_update(self) -> None:
        self._all([h.start_weight_update.remote() for h in self.handles])

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all([h.update_weights.remote(update_info) for h in self.handles])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all([h.finish_weight_update.remote(self.version) for h in self.handles])

    def shutdown_weight_transfer_engine(self) -> None:
        self._all([h.shutdown_weight_transfer.remote() for h in self.handles])


def trainer_init_info(
    backend: str, *, rank: int, world_size: int, bucket_bytes: int, timeout_s: float
) -> TrainerInitInfo:
    """The backend's trainer init info with a fresh rendezvous address on this (rank 0's) node."""
    import ray

    address, port = ray.util.get_node_ip_address(), free_port()
    if backend == GLOO:
        return GlooTrainerInitInfo(
            master_address=address,
            master_port=port,
            world_size=world_size,
            bucket_bytes=bucket_bytes,
            timeout_s=timeout_s,
            rank=rank,
        )
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    return NCCLTrainerInitInfo(
        master_address=address,
        master_port=port,
        world_size=world_size,
        packed=True,
        packed_buffer_size_bytes=bucket_bytes,
        rank=rank,
    )


def start_trainer_transfer(
    module: torch.nn.Module,
    *,
    gather: Callable[[list[torch.Tensor]], AbstractContextManager] | None,
    generators: list[Any],
    rank_offsets: list[int],
    world_size: int,
    rank: int,
    sync: Any,  # schemas.run_config.WeightSyncConfig
) -> Any:
    """The learner side of vLLM's weight-transfer protocol for one rank: joins the group with the generator
    replicas (rank 0 hosts the rendezvous and drives them). Returns the trainer-side transfer object."""
    register_gloo_backend()
    source = LearnerWeightSource(module, wire_dtype=resolve_wire_dtype(sync.wire_dtype), gather=gather)
    info = trainer_init_info(
        resolve_backend(sync.backend),
        rank=rank,
        world_size=world_size,
        bucket_bytes=int(sync.bucket_mb * (1 << 20)),
        timeout_s=sync.timeout_s,
    )
    client = GeneratorClient(generators, rank_offsets)
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
