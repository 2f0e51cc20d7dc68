"""Weight sync learner -> generator: seconds per GB through covrl's path (DeepSpeed rank 0 state dict ->
one object in Ray's object store -> vLLM ``reload_weights`` in the generator actor), for the tiny model
and a ~0.5B-parameter randomly initialised model built locally from a config.
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
from schemas.run_config import AlgorithmConfig, GeneratorConfig, LearnerConfig  # noqa: E402


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
        .remote(GeneratorConfig(threads=2, max_model_len=64, kv_cache_gib=1), str(model))
    )
    ray.get([learner.info.remote(), gen.info.remote()])
    totals, loads = [], []
    nbytes = (model / "model.safetensors").stat().st_size  # fp32, tied weights stored once
    for v in range(repeats + 1):
        t0 = time.perf_counter()
        ref = learner.get_weights.remote()
        load_s = ray.get(gen.load_weights.remote(ref, v + 1))
        total = time.perf_counter() - t0
        del ref
        if v:
            totals.append(total)
            loads.append(load_s)
    ray.kill(learner)
    ray.kill(gen)
    gb = nbytes / 1e9
    return {
        "GB": gb,
        "total_min": min(totals),
        "total_med": statistics.median(totals),
        "load_min": min(loads),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = {s: measure(s, args.repeats) for s in args.sizes.split(",")}
    print(
        "\npath: DeepSpeed rank-0 state_dict -> numpy -> one Ray object -> vLLM collective_rpc('reload_weights')"
    )
    print(
        f"{'model':6} {'GB (fp32)':>10} {'total s (min/med)':>19} {'of which vLLM load s':>21} {'s per GB':>9}"
    )
    for s, r in rows.items():
        print(
            f"{s:6} {r['GB']:10.3f} {r['total_min']:8.3f} / {r['total_med']:6.3f} {r['load_min']:21.3f} "
            f"{r['total_min'] / r['GB']:9.2f}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
