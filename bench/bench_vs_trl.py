"""covrl vs TRL's GRPOTrainer on the same tiny model, task, batch (32 prompts x 8 samples), max new tokens
(48), number of RL steps, 4 optimizer updates per rollout batch, lr, clip and temperature: samples/s of
each (ratio; target covrl >= 2x TRL) and held-out pass@1 at T=1 after the same number of steps.

Both at the same precision: fp32, and bf16 (TRL's own default; covrl: `learner.dtype=bfloat16` and vLLM in
bf16), each covrl mode against TRL at that precision: `sync`, and `async` with core lending (generation of
step t+1 overlaps learning of step t; the learner lends one of the 2 cores while vLLM generates).

TRL is an optional, benchmark-only dependency, never a runtime one. Install it beside the venv without
touching covrl's pins, then run:
    .venv/bin/pip install --target .cache/trl-pkgs --no-deps trl accelerate datasets multiprocess xxhash pandas pytz
    PYTHONPATH=.cache/trl-pkgs .venv/bin/python bench/bench_vs_trl.py [--steps 10] [--skip-bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS, GROUP, MAX_NEW, UPDATES, LR = 32, 8, 48, 4, 1e-4


COVRL_MODES = {
    "sync": [],
    "async": ["schedule.mode=async", "generator.threads=1", "learner.threads_while_generating=1"],
}
BF16 = ["learner.dtype=bfloat16", "generator.engine_kwargs={dtype: bfloat16}"]


def run_covrl(
    steps: int,
    out: Path,
    extra: list[str],
    *,
    prompts: int = PROMPTS,
    group: int = GROUP,
    max_new: int = MAX_NEW,
    model_path: str | None = None,
    fixed_length: bool = False,
    evaluate: bool = True,
) -> dict:
    """One covrl training run in this process. ``model_path``: a model directory (None = the embedded
    tiny model); ``fixed_length``: every response is ``max_new`` tokens (EOS masked until then);
    ``evaluate=False``: the start/end evaluation shrinks to one sample (random-weight models have nothing
    to measure, and at long lengths it would cost more than the steps). ``rows`` holds the per-step
    metrics (time/*, rss per role) for callers that split the step by role."""
    from pipeline.train import main as train_main

    sets = [
        f"schedule.steps={steps}",
        "schedule.eval_every=0",
        "schedule.checkpoint_every=0",
        f"run_dir={out}",
        "metrics.tensorboard=false",
        f"schedule.prompts_per_step={prompts}",
        f"schedule.group_size={group}",
        f"generator.max_new_tokens={max_new}",
        f"learner.mini_batches={UPDATES}",
        f"learner.lr={LR}",
        # TRL does not measure the entropy after each update; covrl's entropy-dynamics metric is opt-in here
        "learner.measure_entropy_change_every=0",
        *extra,
    ]
    if model_path is not None:
        # prompts are < 32 tokens; the KV cache must hold a whole batch at long lengths
        sets += [f"model.path={model_path}", f"generator.max_model_len={max_new + 32}"]
    if fixed_length:
        sets.append(f"generator.min_new_tokens={max_new}")
    if not evaluate:
        sets += ["schedule.eval_prompts=1", "schedule.eval_samples=1"]
    t0 = time.perf_counter()
    assert train_main([x for s in sets for x in ("--set", s)]) == 0
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["time/step"] for r in rows)  # evaluation runs outside the step (as outside TRL's clock)
    return {
        "train_s": train_s,
        "wall_s": wall,
        "samples_per_s": steps * prompts * group / train_s,
        "pass@1_before": rows[0]["eval/pass@1"],
        "pass@1_after": rows[-1]["final/pass@1"],
        "rows": rows,
    }


class _TRLClock:
    """Per-RL-step wall time of a GRPOTrainer, split into generation (HF generate), reward scoring and the
    rest (old log-probs, the updates, the optimizer and the trainer's own bookkeeping, which TRL does not
    separate). Wraps the trainer's methods by name, so it reads nothing TRL does not already call."""

    def __init__(self, trainer, updates: int) -> None:
        self.updates, self.steps, self._t = updates, [], {"generate": 0.0, "verify": 0.0}
        for name, key in (("_generate_single_turn", "generate"), ("_calculate_rewards", "verify")):
            setattr(trainer, name, self._timed(getattr(trainer, name), key))

    def _timed(self, fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._t[key] += time.perf_counter() - t0

        return wrapper

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, *a, **k):
                clock._start, clock._cpu = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, *a, **k):
                # one RL step = `updates` optimizer steps over one generation batch
                if state.global_step % clock.updates == 0:
                    now = time.perf_counter()
                    step = {"wall": now - clock._start, **clock._t}
                    step["learner"] = step["wall"] - step["generate"] - step["verify"]
                    step["cpu"] = time.process_time() - clock._cpu  # every thread of the one process
                    clock.steps.append(step)
                    clock._start, clock._t = now, {"generate": 0.0, "verify": 0.0}
                    clock._cpu = time.process_time()

        return _Cb()


def run_trl(
    steps: int,
    model_path: str,
    out: Path,
    bf16: bool,
    *,
    prompts: int = PROMPTS,
    group: int = GROUP,
    max_new: int = MAX_NEW,
    fixed_length: bool = False,
    evaluate: bool = True,
) -> dict:
    """TRL's GRPOTrainer on the same job; ``steps`` (a list of per-RL-step timings) as from ``_TRLClock``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from pipeline.data.addition import make_rows, score_response
    from pipeline.data.tiny_model import evaluate_pass_at_1
    from schemas.data_config import SyntheticTaskConfig

    torch.set_num_threads(2)
    task = SyntheticTaskConfig()
    train = make_rows(task, "train")[: steps * prompts]
    held_out = make_rows(task, "eval")[:256]
    data = Dataset.from_list([{"prompt": r["prompt"], "ground_truth": r["ground_truth"]} for r in train])

    def reward(completions, ground_truth, **_):
        return [score_response(c, g)[0] for c, g in zip(completions, ground_truth)]

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=bf16,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        per_device_train_batch_size=prompts * group // UPDATES,
        steps_per_generation=UPDATES,
        num_generations=group,
        max_completion_length=max_new,
        # HF generate's counterpart of covrl's generator.min_new_tokens (vLLM's min_tokens)
        generation_kwargs={"min_new_tokens": max_new} if fixed_length else None,
        temperature=1.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        max_steps=steps * UPDATES,
        seed=0,
        dataloader_num_workers=0,
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok
    )
    clock = _TRLClock(trainer, UPDATES)
    trainer.add_callback(clock.callback())
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    model = trainer.model.eval()
    acc_after = (
        evaluate_pass_at_1(model, tok, held_out, max_new_tokens=max_new, temperature=1.0) if evaluate else 0.0
    )
    return {
        "train_s": train_s,
        "samples_per_s": steps * prompts * group / train_s,
        "pass@1_after": acc_after,
        "steps": clock.steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-bf16", action="store_true")
    args = ap.parse_args()
    from pipeline.data.tiny_model import ensure_tiny_model
    from schemas.run_config import RunConfig

    cfg = RunConfig()
    model_path = str(ensure_tiny_model(cfg.model.tiny, cfg.data.synthetic))
    out = Path(tempfile.mkdtemp(prefix="covrl-bench-trl-"))
    rows: list[tuple[str, str, dict[str, float]]] = []
    for precision in ["fp32"] if args.skip_bf16 else ["fp32", "bf16"]:
        for mode, extra in COVRL_MODES.items():
            run = run_covrl(
                args.steps, out / f"covrl-{mode}-{precision}", extra + (BF16 if precision == "bf16" else [])
            )
            rows.append((f"covrl {mode}", precision, run))
        rows.append(
            ("TRL", precision, run_trl(args.steps, model_path, out / f"trl-{precision}", precision == "bf16"))
        )
    print(
        f"\n{args.steps} RL steps x {PROMPTS} prompts x {GROUP} samples, {UPDATES} updates/step, max {MAX_NEW} new tokens; "
        f"pass@1 before RL {rows[0][2]['pass@1_before']:.3f}"
    )
    print(f"{'':12} {'precision':>9} {'train s':>8} {'samples/s':>10} {'vs TRL':>7} {'pass@1 after':>13}")
    for name, precision, r in rows:
        trl = next(x for n, p, x in rows if n == "TRL" and p == precision)
        ratio = r["samples_per_s"] / trl["samples_per_s"]
        print(
            f"{name:12} {precision:>9} {r['train_s']:8.1f} {r['samples_per_s']:10.1f} {ratio:7.2f} {r['pass@1_after']:13.3f}"
        )
    best = max(
        r["samples_per_s"] / next(x for n, p, x in rows if n == "TRL" and p == pr)["samples_per_s"]
        for name, pr, r in rows
        if name != "TRL"
    )
    print(
        f"best covrl / TRL samples/s at the same precision: {best:.2f} -> {'PASS' if best >= 2.0 else 'FAIL'} (target >= 2.0)"
    )


if __name__ == "__main__":
    main()
