"""Peak extra memory of chunked vs naive log-prob + entropy for a 150k vocabulary.

Each variant runs in a fresh subprocess (so allocator caches and earlier peaks cannot leak between
variants). The child creates its inputs in place (``torch.empty(...).normal_()``: no temporaries),
reads its current RSS as the baseline, runs the variant, and reports
``ru_maxrss - baseline``: the high-water growth caused by the computation itself.
(tracemalloc does not see torch's allocations, hence RSS.)

Cases:
- ``logits``: bf16 logits (N, V) already exist (they are the model's output); forward under
  ``no_grad`` as when scoring old / reference log-probs. Naive = fp32 ``log_softmax`` over all.
- ``hidden``: hidden states (N, D) and LM-head weight (V, D); forward + backward. Naive = full
  ``hidden @ W.T`` logits then ``log_softmax``; chunked = ``logprobs_from_hidden`` (checkpointed).

Usage: ``python bench/bench_entropy_memory.py [--tokens 2048] [--vocab 150000] [--chunk 256]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(case: str, variant: str, n: int, v: int, d: int, chunk: int) -> None:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.core.logprobs import logprobs_and_entropy, logprobs_from_hidden, naive_logprobs_and_entropy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    labels = torch.randint(0, v, (n,))
    if case == "logits":
        logits = torch.empty(n, v, dtype=torch.bfloat16).normal_()
    else:
        hidden = torch.empty(n, d).normal_().requires_grad_(True)
        weight = torch.empty(v, d).normal_(std=d**-0.5).requires_grad_(True)
    base = _rss_bytes()
    t0 = time.perf_counter()
    if case == "logits":
        with torch.no_grad():
            if variant == "naive":
                lp, ent = naive_logprobs_and_entropy(logits, labels)
            else:
                lp, ent = logprobs_and_entropy(logits, labels, chunk_size=chunk)
    else:
        if variant == "naive":
            lp, ent = naive_logprobs_and_entropy(hidden @ weight.t(), labels)
        else:
            lp, ent = logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk)
        (lp.sum() + 0.1 * ent.sum()).backward()
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"extra_bytes": max(0, peak - base), "seconds": secs, "checksum": float(lp.sum())}))


def run_child(case: str, variant: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        case,
        variant,
        "--tokens",
        str(args.tokens),
        "--vocab",
        str(args.vocab),
    ]
    cmd += ["--hidden", str(args.hidden), "--chunk", str(args.chunk)]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.tokens, args.vocab, args.hidden, args.chunk)
        return 0
    n, v = args.tokens, args.vocab
    print(
        f"N={n} tokens, V={v}, D={args.hidden}, chunk={args.chunk}; one full N x V fp32 = {n * v * 4 / 2**20:.0f} MiB"
    )
    print(f"{'case':<30}{'naive MiB':>11}{'chunked MiB':>13}{'ratio':>8}{'naive s':>9}{'chunked s':>11}")
    for case, label in (("logits", "logits bf16, fwd no-grad"), ("hidden", "hidden->logits, fwd+bwd")):
        naive, chunked = run_child(case, "naive", args), run_child(case, "chunked", args)
        if abs(naive["checksum"] - chunked["checksum"]) > 1e-3 * abs(naive["checksum"]) + 1e-2:
            print(f"  checksum mismatch: {naive['checksum']} vs {chunked['checksum']}")
            return 1
        mb_n, mb_c = naive["extra_bytes"] / 2**20, chunked["extra_bytes"] / 2**20
        ratio = mb_n / mb_c if mb_c > 0 else float("inf")
        print(
            f"{label:<30}{mb_n:>11.0f}{mb_c:>13.0f}{ratio:>7.1f}x{naive['seconds']:>9.2f}{chunked['seconds']:>11.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
