"""Peak memory and time of one learner step: gradient checkpointing on vs off, side by side; with
``--validate``, the measured peaks against `covrl plan`'s estimate (pipeline/driver/memory_plan.py).

Every measurement runs in a fresh subprocess (no allocator cache or earlier peak leaks between variants):
the child imports everything, reads its RSS as the baseline, builds the learner, runs one
``train_step`` (old log-probs, one mini-batch update, optimizer step) and reports ``ru_maxrss`` minus the
baseline (and the sampled peak of anonymous memory over its own baseline, ``AnonPeak``), the step's
seconds and a checksum of the updated parameters (equal on and off: same update).
The child runs with glibc malloc settings (``EXACT_RSS_MALLOC``) under which peak RSS is live memory, not
allocator history.

``--engine deepspeed`` (default) is the real learner (``actors.learner.Learner``, one rank, ZeRO as set);
``--engine core`` is ``pipeline.core.ppo_update`` with plain SGD (no DeepSpeed: quicker to start; what the
unit test uses to check that checkpointing lowers the peak).

    .venv/bin/python bench/bench_learner_memory.py [--size act] [--rows 4] [--prompt 16] [--response 496] [--repeats 3]
    .venv/bin/python bench/bench_learner_memory.py --validate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_dir(size: str, max_positions: int) -> Path:
    from bench._models import build_random_model

    return build_random_model(
        size, Path(tempfile.gettempdir()) / f"covrl-bench-{size}-{max_positions}", max_positions=max_positions
    )


def _warm_up(build) -> None:
    """One forward/backward of a throwaway model: torch's first autograd and kernel set-up (~70 MiB of RSS)
    then lands before the baseline, not in the step's peak."""
    model = build()
    model.train()
    model(input_ids=__import__("torch").randint(4, 18, (1, 8))).logits.sum().backward()


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class AnonPeak:
    """Peak anonymous RSS (heap and tensor memory, no file-backed pages), sampled every 2 ms by a thread.
    Total peak RSS also counts library and model-file pages, which the kernel may reclaim before the
    baseline and fault back in during the step on a machine under memory pressure; a loaded suite run
    measured the checkpointed step's RSS at 451 MiB against 145 MiB quiet (the cause not pinned down; this
    metric leaves file pages out). Anonymous memory is the step's own: heap and tensors.
    A sampled peak can miss a spike shorter than the interval; a step's activation peak lasts the whole
    backward pass."""

    def __init__(self, interval_s: float = 0.002):
        import threading

        self.base = self.peak = _anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, _anon_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(0, max(self.peak, _anon_bytes()) - self.base)


def child(args) -> None:
    import resource

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from actors.learner import Learner
    from bench.bench_entropy_memory import _rss_bytes
    from pipeline.core.model_forward import enable_gradient_checkpointing
    from pipeline.core.ppo_update import ppo_update
    from schemas.run_config import AlgorithmConfig, LearnerConfig
    from tests.helpers import SGDTrainable, synthetic_train_batch, tiny_model

    torch.set_num_threads(args.threads)
    batch = synthetic_train_batch(
        args.rows,
        prompt_len=(args.prompt, args.prompt + 1),
        response_len=(args.response, args.response + 1),
        vocab=(4, 18),
        group_size=args.rows,
    )
    cfg = LearnerConfig(
        mini_batches=1,
        micro_batch_size=args.rows,
        gradient_checkpointing=bool(args.checkpointing),
        zero_stage=args.zero_stage,
        dtype=args.dtype,
        threads=args.threads,
        lr=1e-3,
    )
    if args.engine == "deepspeed":
        import deepspeed  # noqa: F401  (the learner imports it on start; the library is not the step's memory)
    _warm_up(tiny_model)
    base = _rss_bytes()
    anon = AnonPeak()
    if args.engine == "deepspeed":
        learner = Learner(cfg, AlgorithmConfig(), args.model, master_port=args.port)
        module = learner.engine.module
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            learner.train_step(batch, step=step)
    else:
        module = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        if args.checkpointing:
            enable_gradient_checkpointing(module)
        t0 = time.perf_counter()
        ppo_update(
            SGDTrainable(module, lr=1e-2),
            batch,
            algo=AlgorithmConfig(),
            learner=cfg,
            temperature=1.0,
            seed=0,
        )
    secs = time.perf_counter() - t0
    anon_peak = anon.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    checksum = float(sum(np.float64(p.detach().float().abs().sum()) for p in module.parameters()))
    out = {
        "peak_bytes": max(0, peak - base),
        "peak_anon_bytes": anon_peak,
        "seconds": secs,
        "checksum": checksum,
    }
    print(json.dumps(out | {"checkpointing": bool(getattr(module, "is_gradient_checkpointing", False))}))


#: glibc malloc settings for the child: every block over 128 KiB (all activations and gradients) is its own
#: mmap, returned to the OS when freed, and freed heap memory is trimmed. With glibc's defaults the mmap
#: threshold grows with the first large frees, later tensors come from a heap that keeps freed pages, and
#: the same step's peak RSS varied by 40% between runs (292 vs 410 MiB with checkpointing on); with these it
#: is the step's live memory to within 1 MiB run to run. The cost is time (an mmap per tensor, ~1.3x on this
#: step), so a step's seconds are comparable between variants of one run, not with a training job.
EXACT_RSS_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(
    model: Path,
    *,
    rows: int,
    prompt: int,
    response: int,
    checkpointing: bool,
    engine: str = "deepspeed",
    zero_stage: int = 2,
    dtype: str = "float32",
    threads: int = 1,
    steps: int = 1,
) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--engine", engine]
    cmd += ["--rows", str(rows), "--prompt", str(prompt), "--response", str(response)]
    cmd += ["--checkpointing", str(int(checkpointing)), "--zero-stage", str(zero_stage), "--dtype", dtype]
    cmd += ["--threads", str(threads), "--port", str(_free_port()), "--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.update({k: v for k, v in EXACT_RSS_MALLOC.items() if k not in os.environ})
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_checkpointing(args) -> None:
    model = model_dir(args.size, args.prompt + args.response + 8)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(args.repeats):
        for on in (False, True):  # interleaved: drift on a shared box hits both alike
            runs[on].append(
                run_child(
                    model,
                    rows=args.rows,
                    prompt=args.prompt,
                    response=args.response,
                    checkpointing=on,
                    dtype=args.dtype,
                    threads=args.threads,
                )
            )
    sums = {r["checksum"] for rs in runs.values() for r in rs}
    tokens = args.rows * (args.prompt + args.response)
    print(
        f"model {args.size}, {args.rows} x {args.prompt + args.response} tokens ({tokens}), {args.dtype}, "
        f"{args.threads} threads, {args.repeats} repeats; parameter checksums after the step: {sorted(sums)}"
    )
    print(
        f"{'checkpointing':14}{'RSS MiB min':>12}{'median':>9}{'anon MiB min':>14}{'median':>9}"
        f"{'step s min':>12}{'median':>9}"
    )
    for on, rs in runs.items():
        peaks = [r["peak_bytes"] / 2**20 for r in rs]
        anon = [r["peak_anon_bytes"] / 2**20 for r in rs]
        secs = [r["seconds"] for r in rs]
        print(
            f"{'on' if on else 'off':14}{min(peaks):12.0f}{statistics.median(peaks):9.0f}"
            f"{min(anon):14.0f}{statistics.median(anon):9.0f}{min(secs):12.2f}{statistics.median(secs):9.2f}"
        )
    off, on = runs[False], runs[True]

    def ratio(key: str) -> float:
        return min(r[key] for r in on) / min(r[key] for r in off)

    print(
        f"on/off: peak RSS {ratio('peak_bytes'):.2f}x, anonymous {ratio('peak_anon_bytes'):.2f}x (min), "
        f"time {ratio('seconds'):.2f}x (min), "
        f"{statistics.median(r['seconds'] for r in on) / statistics.median(r['seconds'] for r in off):.2f}x (median)"
    )


#: (model size, dtype, ZeRO stage, rows, prompt tokens, response tokens): the CPU default (fp32) on the tiny
#: architecture and on Qwen2.5-0.5B's block and vocabulary, at several sequence lengths. (bf16 is not run: the
#: LM head's bf16 backward falls back to torch's reference CPU GEMM here, far too slow on a shared box.)
VALIDATION_CASES = [
    ("tiny", "float32", 2, 4, 64, 64),
    ("tiny", "float32", 2, 4, 192, 320),
    ("tiny", "float32", 2, 8, 192, 320),
    ("tiny", "float32", 3, 4, 192, 320),
    ("0.5b-2l", "float32", 2, 2, 192, 64),
    ("0.5b-2l", "float32", 2, 2, 960, 64),
]


def estimate(
    model: Path, *, dtype: str, zero_stage: int, rows: int, prompt: int, response: int, on: bool
) -> int:
    """`covrl plan`'s learner estimate for the child's step (same config as the child runs)."""
    from pipeline.core.memory_estimate import GIB
    from pipeline.driver.config_io import load_config
    from pipeline.driver.memory_plan import learner_memory, resolve_arch

    sets = [f"model.path={model}", f"learner.dtype={dtype}", f"learner.zero_stage={zero_stage}"]
    sets += [
        f"learner.micro_batch_size={rows}",
        "learner.mini_batches=1",
        f"learner.gradient_checkpointing={on}",
    ]
    sets += ["schedule.prompts_per_step=1", f"schedule.group_size={rows}", f"data.max_prompt_tokens={prompt}"]
    sets += [f"generator.max_new_tokens={response}", f"generator.max_model_len={prompt + response}"]
    cfg = load_config(None, sets)
    arch, _ = resolve_arch(cfg)
    return learner_memory(cfg, arch, 80 * GIB).total


def validate(args) -> None:
    print(
        f"{args.steps} learner step(s) (each: old log-probs + one update + AdamW step), 1 rank, "
        "peak RSS over the RSS after imports"
    )
    print(f"{'model':9}{'dtype':>10}{'ZeRO':>5}{'rows x tokens':>15}{'ckpt':>6}{'estimate MiB':>14}"
          f"{'measured MiB':>14}{'error':>8}")  # fmt: skip
    for size, dtype, stage, rows, prompt, response in VALIDATION_CASES:
        if args.only and size != args.only:
            continue
        model = model_dir(size, prompt + response + 8)
        for on in (False, True):
            got = run_child(model, rows=rows, prompt=prompt, response=response, checkpointing=on, dtype=dtype,
                            zero_stage=stage, threads=args.threads, steps=args.steps)  # fmt: skip
            est = estimate(
                model, dtype=dtype, zero_stage=stage, rows=rows, prompt=prompt, response=response, on=on
            )
            err = est / got["peak_bytes"] - 1
            print(
                f"{size:9}{dtype:>10}{stage:>5}{f'{rows} x {prompt + response}':>15}{'on' if on else 'off':>6}"
                f"{est / 2**20:14.0f}{got['peak_bytes'] / 2**20:14.0f}{err:+8.0%}",
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--validate", action="store_true", help="measured peaks vs covrl plan's estimate")
    ap.add_argument("--model")
    ap.add_argument("--engine", choices=("deepspeed", "core"), default="deepspeed")
    ap.add_argument("--size", default="act", help="bench/_models.py SIZES key")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--response", type=int, default=496)
    ap.add_argument("--checkpointing", type=int, default=0)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, help="(child) DeepSpeed rendezvous port")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--steps",
        type=int,
        default=1,
        help="learner steps per child; AdamW allocates its moments in the first step, so 2 shows the steady "
        "state (moments and activations alive together)",
    )
    ap.add_argument("--only", help="--validate: only the cases of this model size")
    args = ap.parse_args()
    if args.child:
        child(args)
    elif args.validate:
        validate(args)
    else:
        compare_checkpointing(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
