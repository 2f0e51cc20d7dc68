"""Where a role's time goes at one point of the scaling sweep: covrl's generator or learner in-process (no
Ray), after one warm-up call, under cProfile (Python frames) and torch's profiler (ops); with `--vs-hf`,
the generator is timed side by side with HF `generate` (TRL's engine on CPU) on the same model and prompts.
    .venv/bin/python bench/profile_roles.py generator --max-new 1024 --prompts 2 [--vs-hf]
    .venv/bin/python bench/profile_roles.py learner --max-new 1024 --prompts 2
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_scaling import model_dir  # noqa: E402


def prompts_batch(n: int):
    from transformers import AutoTokenizer

    from pipeline.data.addition import make_rows
    from pipeline.driver.rollout import encode_prompts
    from schemas.data_config import SyntheticTaskConfig

    rows = [r | {"index": i} for i, r in enumerate(make_rows(SyntheticTaskConfig(), "train")[:n])]
    return rows, encode_prompts(rows, AutoTokenizer.from_pretrained(model_dir("tiny")), step=1)


def profiled(fn, label: str, top: int):
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    out = fn()
    prof.disable()
    print(f"\n== {label}: {time.perf_counter() - t0:.2f} s")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    print("\n".join(s.getvalue().splitlines()[: top + 12]))
    return out


def torch_ops(fn, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def generator(args) -> None:
    from actors.generator import Generator
    from schemas.run_config import GeneratorConfig

    path = model_dir(args.size)
    cfg = GeneratorConfig(
        threads=args.threads,
        max_new_tokens=args.max_new,
        min_new_tokens=args.max_new,
        max_model_len=args.max_new + 32,
        kv_cache_gib=2,
    )
    gen = Generator(cfg, path)
    rows, prompts = prompts_batch(args.prompts)
    gen.generate(prompts, n=args.group, report=False)  # warm-up
    if args.vs_hf:
        return vs_hf(gen, prompts, path, args)
    profiled(lambda: gen.generate(prompts, n=args.group, report=False), "covrl generator.generate", args.top)
    if args.torch_ops:
        torch_ops(lambda: gen.generate(prompts, n=args.group, report=False), args.top)


def vs_hf(gen, prompts, path: str, args) -> None:
    """covrl's generator role vs HF generate as TRL calls it (left-padded prompts, each repeated `group`
    times, sampling at T=1, EOS masked until max_new), interleaved, min/median of `repeats`."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok([t for t in prompts.texts for _ in range(args.group)], return_tensors="pt", padding=True)

    def hf():
        with torch.no_grad():
            model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                max_new_tokens=args.max_new,
                min_new_tokens=args.max_new,
                pad_token_id=tok.pad_token_id,
                top_k=0,
            )

    hf()  # warm-up
    times: dict[str, list[float]] = {"covrl generator": [], "HF generate": []}
    for _ in range(args.repeats):
        for name, fn in (
            ("covrl generator", lambda: gen.generate(prompts, n=args.group, report=False)),
            ("HF generate", hf),
        ):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    n_tok = args.prompts * args.group * args.max_new
    for name, ts in times.items():
        print(
            f"{name:16} min {min(ts):6.2f} s  median {statistics.median(ts):6.2f} s  {n_tok / min(ts):8.0f} tok/s"
        )
    print(
        f"HF / covrl time: {min(times['HF generate']) / min(times['covrl generator']):.2f} (min), "
        f"{statistics.median(times['HF generate']) / statistics.median(times['covrl generator']):.2f} (median)"
    )


def learner(args) -> None:
    from actors.learner import Learner
    from schemas.run_config import AlgorithmConfig, LearnerConfig
    from tests.helpers import synthetic_train_batch

    n = args.prompts * args.group
    batch = synthetic_train_batch(
        n,
        prompt_len=(9, 11),
        response_len=(args.max_new, args.max_new + 1),
        vocab=(4, 18),
        group_size=args.group,
        sampler_logprob=-2.8,
    )
    fields = dict(threads=args.threads, mini_batches=4, micro_batch_size=64, measure_entropy_change_every=0)
    fields |= dict(kv.split("=", 1) for kv in args.set)  # pydantic parses the strings
    lr = Learner(
        LearnerConfig(**fields),
        AlgorithmConfig(),
        model_dir(args.size),
        master_port=29641,
    )
    lr.train_step(batch, step=1)  # warm-up
    if args.vs_torch:
        return vs_torch(lr, batch, args)
    profiled(lambda: lr.train_step(batch, step=2), "covrl learner.train_step", args.top)
    if args.torch_ops:
        torch_ops(lambda: lr.train_step(batch, step=3), args.top)


def vs_torch(lr, batch, args) -> None:
    """covrl's learner step vs the same work as a plain torch loop (TRL's learner on CPU does this: HF
    model, torch AdamW, no engine): one no-grad log-prob pass over the batch, then one clipped-ratio
    update per mini-batch (forward, backward, grad clip, AdamW). Interleaved, min/median of `repeats`;
    the gap is what covrl's engine and update loop add."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.core.model_forward import make_micro_batch

    model = AutoModelForCausalLM.from_pretrained(model_dir(args.size), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    mb = make_micro_batch(batch, np.arange(len(batch)))
    adv = torch.from_numpy(batch.advantages)[:, None]

    def logp(rows):
        logits = model(input_ids=mb.input_ids[rows], attention_mask=mb.attention_mask[rows]).logits
        picked = logits.gather(1, mb.positions[rows][..., None].expand(-1, -1, logits.shape[-1]))
        return torch.log_softmax(picked, -1).gather(-1, mb.labels[rows][..., None])[..., 0]

    def plain():
        model.eval()
        with torch.no_grad():
            old = logp(slice(None))
        model.train()
        for rows in np.array_split(np.random.permutation(len(batch)), 4):
            rows = torch.from_numpy(rows)
            ratio = torch.exp(logp(rows) - old[rows])
            a = adv[rows]
            loss = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)[mb.response_mask[rows]].mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    plain()  # warm-up
    times: dict[str, list[float]] = {"covrl learner": [], "plain torch": []}
    for k in range(args.repeats):
        for name, fn in (
            ("covrl learner", lambda k=k: lr.train_step(batch, step=2 + k)),
            ("plain torch", plain),
        ):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:14} min {min(ts):6.2f} s  median {statistics.median(ts):6.2f} s")
    print(
        f"covrl / plain time: {min(times['covrl learner']) / min(times['plain torch']):.2f} (min), "
        f"{statistics.median(times['covrl learner']) / statistics.median(times['plain torch']):.2f} (median)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["generator", "learner"])
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--max-new", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vs-hf", action="store_true")
    ap.add_argument("--vs-torch", action="store_true", help="learner: side by side with a plain torch loop")
    ap.add_argument("--torch-ops", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="learner: a LearnerConfig field, KEY=VALUE")
    args = ap.parse_args()
    {"generator": generator, "learner": learner}[args.role](args)


if __name__ == "__main__":
    main()
