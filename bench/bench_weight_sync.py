"""Weight sync learner -> generator: seconds per GB through covrl's two paths, side by side on the same
actors, for the tiny model and a ~0.5B-parameter randomly initialised model built locally from a config:
- object_store: DeepSpeed rank 0 state dict -> one object in Ray's object store -> vLLM ``reload_weights``;
- collective: vLLM's weight-transfer protocol, bucketed broadcast over a gloo group (NCCL on GPUs).
    .venv/bin/python bench/bench_weight_sync.py [--sizes tiny,0.5b] [--repeats 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from bench._models import build_random_model  # noqa: E402
from schemas.run_config import AlgorithmConfig, GeneratorConfig, LearnerConfig, WeightSyncConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(size: str, repeats: int) -> dict[str, float]:
    from actors.generator import Generator
    from actors.learner import Learner

    model = build_random_model(size, Path(tempfile.gettempdir()) / f"covrl-bench-{size}")
    learner = (
        ray.remote(Learner)
        .options(num_cpus=1)
        .remote(LearnerConfig(threads=2), AlgorithmConfig(), str(model), master_port=free_port())
    )
    gen = (
        ray.remote(Generator)
        .options(num_cpus=1)
        .remote(
            GeneratorConfig(threads=2, max_model_len=64, kv_cache_gib=1),
            str(model),
            weight_sync=WeightSyncConfig(method="collective"),  # enables both paths
        )
    )
    ray.get([learner.info.remote(), gen.info.remote()])
    ray.get(learner.init_weight_transfer.remote([gen], [1], 2, WeightSyncConfig(method="collective")))
    totals, loads, collective = [], [], []
    nbytes = (model / "model.safetensors").stat().st_size  # fp32, tied weights stored once
    for v in range(repeats + 1):
        t0 = time.perf_counter()
        ref = learner.get_weights.remote()
        load_s = ray.get(gen.load_weights.remote(ref, v + 1))
        total = time.perf_counter() - t0
        del ref
        t0 = time.perf_counter()
        ray.get(learner.send_weights.remote(v + 1))
        coll = time.perf_counter() - t0
        if v:
            totals.append(total)
            loads.append(load_s)
            collective.append(coll)
    ray.kill(learner)
    ray.kill(gen)
    gb = nbytes / 1e9
    return {
        "GB": gb,
        "total_min": min(totals),
        "total_med": statistics.median(totals),
        "load_min": min(loads),
        "coll_min": min(collective),
        "coll_med": statistics.median(collective),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = {s: measure(s, args.repeats) for s in args.sizes.split(",")}
    print("\nobject_store: DeepSpeed rank-0 state_dict -> numpy -> one Ray object -> vLLM reload_weights")
    print("collective:   vLLM weight transfer (init/start/update/finish), bucketed gloo broadcast, fp32")
    print(
        f"{'model':6} {'GB (fp32)':>10} {'object_store s (min/med)':>25} {'s/GB':>6} "
        f"{'collective s (min/med)':>23} {'s/GB':>6} {'collective / object_store':>26}"
    )
    for s, r in rows.items():
        print(
            f"{s:6} {r['GB']:10.3f} {r['total_min']:14.3f} / {r['total_med']:8.3f} {r['total_min'] / r['GB']:6.2f} "
            f"{r['coll_min']:12.3f} / {r['coll_med']:8.3f} {r['coll_min'] / r['GB']:6.2f} "
            f"{r['coll_min'] / r['total_min']:26.2f}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
