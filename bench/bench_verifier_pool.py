"""Samples/s of the ``math`` verifier pool with 1 and 2 replicas on a realistic answer mix.

The mix: boxed fractions (right and wrong), plain numbers, equivalent LaTeX, and unparsable text.
Each configuration is timed ``--repeats`` times after a warm-up; we print min and median samples/s and the
2-vs-1 ratio. On a 2-core box the ideal ratio is < 2 (the driver, Ray and the workers share the cores).

    .venv/bin/python bench/bench_verifier_pool.py --samples 512 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray

from actors.verifier import VerifierWorker
from pipeline.driver.verification import score_with_pool
from schemas.verifier_config import VerifierConfig, VerifierSpec


def answer_mix(n: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """n (prompt, response, ground truth, source) rows cycling through five realistic answer kinds."""
    responses, truths = [], []
    for i in range(n):
        a, b = i % 17 + 1, i % 5 + 2
        kind = i % 5
        if kind == 0:
            responses.append(rf"Adding up the parts gives \boxed{{\frac{{{a}}}{{{b}}}}}.")
        elif kind == 1:
            responses.append(f"The final answer is {a / b:.6f}")
        elif kind == 2:
            responses.append(rf"Thus the answer is $\boxed{{{a + 1}/{b}}}$")  # wrong
        elif kind == 3:
            responses.append(rf"We get $x = \dfrac{{{2 * a}}}{{{2 * b}}}$")
        else:
            responses.append("I could not finish the computation, sorry, the series diverges somewhere.")
        truths.append(rf"\frac{{{a}}}{{{b}}}")
    return [f"q{i}" for i in range(n)], responses, truths, ["math"] * n


def bench(replicas: int, batch: tuple, repeats: int) -> list[float]:
    config = VerifierConfig(default=VerifierSpec(name="math"), replicas=replicas)
    remote = ray.remote(num_cpus=0.5)(VerifierWorker)
    actors = [remote.remote(config, replica=r) for r in range(replicas)]
    ray.get([a.info.remote() for a in actors])
    score_with_pool(actors, *(col[:32] for col in batch))  # warm-up: imports, sympy caches
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        scores, _, stats = score_with_pool(actors, *batch)
        rates.append(len(scores) / (time.perf_counter() - start))
    print(
        f"  replicas={replicas}: score_mean={stats['verifier/score_mean']:.3f} errors={stats['verifier/errors']:.0f}"
    )
    for actor in actors:
        ray.kill(actor)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    batch = answer_mix(args.samples)
    results = {m: bench(m, batch, args.repeats) for m in (1, 2)}
    ray.shutdown()
    print(f"math verifier pool, {args.samples} samples, {args.repeats} repeats (samples/s):")
    for m, rates in results.items():
        print(f"  replicas={m}: min {min(rates):8.1f}  median {statistics.median(rates):8.1f}")
    for name, pick in (("min", min), ("median", statistics.median)):
        print(f"  ratio 2/1 ({name}): {pick(results[2]) / pick(results[1]):.2f}x")


if __name__ == "__main__":
    main()
