"""Time Clip-Cov and KL-Cov against PPO: forward + backward of the loss on precomputed log-probs.

Target: each covariance loss costs <= 1.10x PPO on a batch of >= 64k tokens. All three losses log
the same statistics (clip fractions, KL, covariance percentiles), so the ratio measures the
selection itself (band, random draw / top-k, masking). For transparency it also times the bare
PPO math without any statistics ("ppo core"), and the global path (``select_tokens`` on the whole batch,
then the loss with ``selected=``), which a learner runs once per mini-batch.

Usage: ``python bench/bench_losses.py [--seqs 128] [--len 512] [--repeats 30]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.aggregation import aggregate_loss  # noqa: E402
from pipeline.core.losses import _clipped_surrogate, get_policy_loss, select_tokens  # noqa: E402
from schemas.config import policy_loss  # noqa: E402

TARGET = 1.10


def make_batch(n: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 4, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0).expand(n, t).contiguous()
    logp = -2 * torch.randn(n, t, generator=g).abs()
    old = logp + 0.05 * torch.randn(n, t, generator=g)
    return logp, old, adv, mask


def time_interleaved(steps: dict, repeats: int) -> dict[str, list[float]]:
    """Round-robin timing: one call of each variant per round, so load drift on a shared machine
    hits all variants alike; paired per-round ratios then cancel most of it."""
    for fn in steps.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logp0, old, adv, mask = make_batch(args.seqs, args.len)
    n_tok = args.seqs * args.len
    print(
        f"batch {args.seqs} x {args.len} = {n_tok} tokens ({int(mask.sum())} valid), {args.repeats} repeats"
    )

    configs = {
        "ppo": policy_loss(name="ppo", clip_ratio_high=0.28),
        "clip_cov": policy_loss(name="clip_cov", clip_ratio_high=0.28),
        "kl_cov": policy_loss(name="kl_cov"),
    }

    def make_step(name: str, global_sel: bool = False):
        cfg = configs[name]
        gen = torch.Generator().manual_seed(0)

        def step():
            lp = logp0.clone().requires_grad_(True)
            sel = select_tokens(lp, old, adv, mask, cfg, generator=gen) if global_sel else None
            loss, _ = get_policy_loss(name)(lp, old, adv, mask, cfg, selected=sel, generator=gen)
            loss.backward()

        return step

    def ppo_core():  # the bare PPO math, without the stats every registered loss logs
        lp = logp0.clone().requires_grad_(True)
        neg_kl = torch.clamp(lp - old, -20.0, 20.0)
        pg, _, _ = _clipped_surrogate(neg_kl, adv, configs["ppo"])
        aggregate_loss(pg, mask, "token-mean").backward()

    steps = {
        "ppo": make_step("ppo"),
        "clip_cov": make_step("clip_cov"),
        "kl_cov": make_step("kl_cov"),
        "ppo core (no stats)": ppo_core,
        "clip_cov (global select)": make_step("clip_cov", global_sel=True),
        "kl_cov (global select)": make_step("kl_cov", global_sel=True),
    }
    times = time_interleaved(steps, args.repeats)

    base = times["ppo"]
    ok = True
    print(f"{'loss':<26}{'min ms':>9}{'median ms':>11}{'ratio(min)':>12}{'ratio(paired med)':>19}  verdict")
    for name, ts in times.items():
        r_min = min(ts) / min(base)
        r_med = statistics.median(t / b for t, b in zip(ts, base))
        verdict = ""
        if name in ("clip_cov", "kl_cov"):
            passed = r_med <= TARGET
            ok &= passed
            verdict = f"{'PASS' if passed else 'FAIL'} (target <= {TARGET:.2f}x, paired median)"
        print(
            f"{name:<26}{min(ts) * 1e3:>9.2f}{statistics.median(ts) * 1e3:>11.2f}{r_min:>12.3f}{r_med:>19.3f}  {verdict}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
