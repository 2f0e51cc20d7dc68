"""Generator overhead: covrl's generator role (Ray actor, typed batches, log-prob extraction) vs a bare
in-process vLLM ``LLM.generate`` on the same model, prompts and sampling params. Target >= 0.95.

Both engines live side by side; calls alternate (bare, role, bare, role, ...) so machine noise hits both.
    .venv/bin/python bench/bench_generator.py [--repeats 5] [--prompts 64] [--n 8] [--tokens 48]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from bench._models import build_random_model  # noqa: E402
from schemas.batches import PromptBatch, Ragged  # noqa: E402
from schemas.run_config import GeneratorConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = build_random_model("tiny", Path(tempfile.gettempdir()) / "covrl-bench-tiny")
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    from actors.generator import Generator

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    prompt_ids = [[1, *rng.integers(4, 14, size=8).tolist()] for _ in range(args.prompts)]
    bare = LLM(model=str(model), dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    params = SamplingParams(
        n=args.n, temperature=1.0, max_tokens=args.tokens, ignore_eos=True, logprobs=0, flat_logprobs=True
    )
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = GeneratorConfig(
        threads=args.threads, max_model_len=128, max_new_tokens=args.tokens, engine_kwargs={}
    )
    role = ray.remote(Generator).options(num_cpus=1).remote(cfg, str(model))
    batch = PromptBatch(
        step=0,
        prompt_ids=np.arange(args.prompts, dtype=np.int64),
        tokens=Ragged.from_lists(prompt_ids),
        texts=[""] * args.prompts,
        ground_truths=[""] * args.prompts,
        data_sources=["b"] * args.prompts,
    )
    ray.get(role.info.remote())

    def run_bare() -> float:
        t0 = time.perf_counter()
        outs = bare.generate(requests, params, use_tqdm=False)
        n_tok = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return n_tok / (time.perf_counter() - t0)

    def run_role() -> float:
        t0 = time.perf_counter()
        rollout, _ = ray.get(role.generate.remote(batch, n=args.n, ignore_eos=True, report=False))
        return rollout.responses.values.shape[0] / (time.perf_counter() - t0)

    run_bare(), run_role()  # warm-up (first calls compile kernels)
    bare_tps, role_tps = [], []
    for _ in range(args.repeats):
        bare_tps.append(run_bare())
        role_tps.append(run_role())
    ratios = [r / b for r, b in zip(role_tps, bare_tps)]
    print(f"{args.prompts} prompts x {args.n} samples x {args.tokens} tokens, {args.threads} threads each")
    print(f"{'':12} {'max tok/s':>10} {'median tok/s':>13}")
    print(f"{'bare vLLM':12} {max(bare_tps):10.0f} {statistics.median(bare_tps):13.0f}")
    print(f"{'covrl role':12} {max(role_tps):10.0f} {statistics.median(role_tps):13.0f}")
    best = max(role_tps) / max(bare_tps)
    print(
        f"ratio covrl/bare: best-vs-best {best:.3f}, median of paired {statistics.median(ratios):.3f} "
        f"-> {'PASS' if best >= 0.95 else 'FAIL'} (target >= 0.95)"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
