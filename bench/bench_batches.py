"""Typed batches cost (almost) nothing: validate + round-trip a RolloutBatch of 4,096 samples x 1,024
tokens through Ray's object store vs. the same bare numpy arrays, side by side in one run.

Target (issue 3): typed - bare < 2% of bare + 5 ms. Prints min/median over repeats and PASS/FAIL.
    .venv/bin/python bench/bench_batches.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import ray

from schemas.batches import PromptBatch, Ragged, RolloutBatch

N, T, B, G = 4096, 1024, 512, 8


@ray.remote(num_cpus=0)
class Sink:
    """A consumer in another process: touches every array (so nothing is lazily skipped)."""

    def typed(self, batch: RolloutBatch) -> int:
        return (
            int(batch.responses.values[-1]) + int(batch.sampler_logprobs.shape[0]) + len(batch.response_texts)
        )

    def bare(self, arrays: dict) -> int:
        return int(arrays["values"][-1]) + int(arrays["logprobs"].shape[0]) + len(arrays["texts"])


def make_arrays(rng):
    values = rng.integers(0, 150_000, size=N * T, dtype=np.int32)
    offsets = np.arange(N + 1, dtype=np.int64) * T
    return {
        "prompt_values": rng.integers(0, 150_000, size=B * 64, dtype=np.int32),
        "prompt_offsets": np.arange(B + 1, dtype=np.int64) * 64,
        "values": values,
        "offsets": offsets,
        "logprobs": rng.standard_normal(N * T).astype(np.float32),
        "finish": np.zeros(N, np.int8),
        "texts": ["x" * 64] * N,
        "prompt_ids": np.arange(B, dtype=np.int64),
    }


def typed_batch(a) -> RolloutBatch:
    prompts = PromptBatch(
        step=0,
        prompt_ids=a["prompt_ids"],
        tokens=Ragged(values=a["prompt_values"], offsets=a["prompt_offsets"]),
        texts=["p"] * B,
        ground_truths=["1"] * B,
        data_sources=["s"] * B,
    )
    return RolloutBatch(
        prompts=prompts,
        group_size=G,
        policy_version=0,
        responses=Ragged(values=a["values"], offsets=a["offsets"]),
        sampler_logprobs=a["logprobs"],
        finish_reasons=a["finish"],
        response_texts=a["texts"],
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sink = Sink.remote()
    rng = np.random.default_rng(0)
    bare_t, typed_t = [], []
    for i in range(args.repeats + 2):  # two warm-up rounds
        a = make_arrays(rng)  # fresh (writable) arrays each round, as a generator would produce
        t0 = time.perf_counter()
        ray.get(sink.bare.remote(ray.put(a)))
        t1 = time.perf_counter()
        a2 = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.items()}
        t2 = time.perf_counter()
        ray.get(sink.typed.remote(ray.put(typed_batch(a2))))  # validation included
        t3 = time.perf_counter()
        if i >= 2:
            bare_t.append(t1 - t0)
            typed_t.append(t3 - t2)
    bare_min, typed_min = min(bare_t), min(typed_t)
    bare_med, typed_med = statistics.median(bare_t), statistics.median(typed_t)
    budget = 0.02 * bare_min + 0.005
    print(f"payload: {N} samples x {T} tokens ({(N * T * 8) / 2**20:.0f} MiB of token ids + logprobs)")
    print(f"{'':10} {'min ms':>9} {'median ms':>10}")
    print(f"{'bare':10} {bare_min * 1e3:9.1f} {bare_med * 1e3:10.1f}")
    print(f"{'typed':10} {typed_min * 1e3:9.1f} {typed_med * 1e3:10.1f}")
    overhead = typed_min - bare_min
    print(
        f"overhead (min): {overhead * 1e3:.2f} ms = {overhead / bare_min:+.2%} of bare; ratio typed/bare "
        f"{typed_min / bare_min:.3f} (median {typed_med / bare_med:.3f})"
    )
    print(
        f"target: overhead < 2% of bare + 5 ms = {budget * 1e3:.1f} ms -> {'PASS' if overhead < budget else 'FAIL'}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
