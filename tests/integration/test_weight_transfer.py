"""Collective weight sync: the bucket plan (pure) and the gloo engines over a real gloo group.

The end-to-end path (vLLM workers, DeepSpeed ZeRO-3 ranks, two replicas) is in test_pipeline_e2e.py; here
the two engines talk over real gloo sockets in two threads, with a recording model in place of vLLM's, so
the byte-exactness of every bucket boundary is checked fast."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from actors.weight_transfer import (
    GeneratorClient,
    GlooTrainerInitInfo,
    GlooTrainerWeightTransferEngine,
    GlooWeightTransferEngine,
    free_port,
    plan_buckets,
)


def test_plan_buckets_by_size_and_dtype():
    assert plan_buckets([4, 4, 4], ["float32"] * 3, 8) == [[0, 1], [2]]
    assert plan_buckets([4, 20, 4], ["float32"] * 3, 8) == [[0], [1], [2]]  # an oversize one travels alone
    assert plan_buckets([4, 4, 4], ["float32", "bfloat16", "bfloat16"], 100) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([1], ["float32"], 0)


@given(
    st.lists(
        st.tuples(st.integers(1, 50), st.sampled_from(["float32", "bfloat16"])), min_size=1, max_size=30
    ),
    st.integers(1, 120),
)
def test_plan_buckets_is_an_ordered_partition_within_limits(items, limit):
    sizes, dtypes = [n for n, _ in items], [d for _, d in items]
    buckets = plan_buckets(sizes, dtypes, limit)
    assert [i for b in buckets for i in b] == list(range(len(items)))
    for b in buckets:
        assert len({dtypes[i] for i in b}) == 1
        assert len(b) == 1 or sum(sizes[i] for i in b) <= limit


def test_generator_client_needs_one_offset_per_replica():
    with pytest.raises(ValueError, match="rank offset"):
        GeneratorClient([object(), object()], [1])


class _Source(WeightSource):
    def __init__(self, named):
        self.named = named

    def metadata(self):
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.named]

    def __iter__(self):
        return iter(self.named)


class _RecordingModel:
    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, pairs):
        for name, t in pairs:
            self.loaded[name] = t.clone()


class _InProcessClient:
    """Drives a list of worker engines in this process (the real one drives Generator actors over Ray)."""

    def __init__(self, workers):
        self.workers, self.errors = workers, []

    def _each(self, fn):
        def guarded(w):
            try:
                fn(w)
            except RuntimeError as e:  # a receiver whose sender gave up sees its socket reset
                self.errors.append(e)

        threads = [threading.Thread(target=guarded, args=(w,)) for w in self.workers]
        [t.start() for t in threads]
        [t.join(timeout=60) for t in threads]

    def init_weight_transfer_engine(self, init_info):
        def init(k_w):
            k, w = k_w
            w.init_transfer_engine(w.parse_init_info(init_info | {"rank_offset": 1 + k}))

        threads = [threading.Thread(target=init, args=((k, w),)) for k, w in enumerate(self.workers)]
        [t.start() for t in threads]
        [t.join(timeout=60) for t in threads]

    def start_weight_update(self):
        pass

    def update_weights(self, update_info):
        self._each(lambda w: w.update_weights(update_info))

    def finish_weight_update(self, weight_version=None):
        pass


def _worker():
    parallel = SimpleNamespace(data_parallel_index=0, world_size=1, rank=0)
    vllm_config = SimpleNamespace(parallel_config=parallel, model_config=None)
    return GlooWeightTransferEngine(None, vllm_config, torch.device("cpu"), _RecordingModel())


def _trainer(workers, source, timeout_s):
    """A gloo trainer engine (rank 0, 1 KiB buckets) wired to ``workers`` through an in-process client."""
    info = GlooTrainerInitInfo(
        master_address="127.0.0.1",
        master_port=free_port(),
        world_size=1 + len(workers),
        bucket_bytes=1024,
        timeout_s=timeout_s,
        rank=0,
    )
    client = _InProcessClient(workers)
    return client, GlooTrainerWeightTransferEngine.trainer_init(info, client=client, source=source)


def test_gloo_engines_deliver_every_tensor_exactly_to_every_replica():
    gen = torch.Generator().manual_seed(0)
    named = [
        ("embed.weight", torch.randn(17, 8, generator=gen)),
        ("norm.weight", torch.randn(8, generator=gen)),
        ("head.weight", torch.randn(17, 8, generator=gen).to(torch.bfloat16)),
        ("big.weight", torch.randn(64, 32, generator=gen)),  # larger than a bucket: travels alone
        ("bias", torch.randn(3, generator=gen)),
    ]
    workers = [_worker(), _worker()]
    client, trainer = _trainer(workers, _Source(named), timeout_s=60)
    for round_ in range(2):  # the group is reused across updates
        if round_:
            named[1] = ("norm.weight", named[1][1] + 1)
            trainer.source = _Source(named)
        trainer.send_weights()
        for w in workers:
            assert list(w.model.loaded) == [n for n, _ in named]
            for n, t in named:
                got = w.model.loaded[n]
                assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), n
    assert client.errors == []


def test_trainer_rejects_a_source_that_disagrees_with_its_metadata():
    class Liar(_Source):
        def metadata(self):
            return [ParamMeta("a", torch.float32, (4,))]

    _, trainer = _trainer([_worker()], Liar([("b", torch.zeros(4))]), timeout_s=10)
    with pytest.raises(ValueError, match="disagrees with its metadata"):
        trainer.send_weights()
    trainer.shutdown()  # drops the group: the waiting receiver fails fast instead of hanging to the timeout
