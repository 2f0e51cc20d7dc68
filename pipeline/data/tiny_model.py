"""Bootstrap of the embedded tiny model: build, warm-start by SFT, evaluate, cache.

Why: no hub is reachable here, so the default run needs its own policy. A ~1.8M-parameter Llama with a
character tokenizer is SFT'd on the configured built-in task (``pipeline.data.tasks``: addition by default, or
countdown) until its held-out pass@1 at temperature 1 enters a target band (default [0.2, 0.6], stop at the
first evaluation >= 0.3): good enough that RL gets reward signal, bad enough that RL has room to improve.
The window is narrow (addition: step 125: 0.08, step 175: 0.52), so the stop is by evaluation, never a
fixed step. The task supplies everything task-specific: alphabet, texts, scorer, response length.

The result is a standard HF directory (config.json, model.safetensors, tokenizer files,
generation_config.json, plus bootstrap.json with the measured accuracy and time) that transformers and
vLLM load. It is cached under ``$COVRL_CACHE/tiny/<hash of settings>``, built in a temp dir, renamed
atomically, with a lock file so concurrent processes build it once.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.data.model_cache import ensure_built, settings_key
from pipeline.data.tasks import task_spec
from pipeline.data.tiny_eval import evaluate_pass_at_1, evaluate_pass_at_k, expected_pass_at_1
from pipeline.data.tokenizer import build_char_tokenizer
from schemas.data_config import TaskConfig, TinyModelConfig

#: Bump when the build recipe changes in a way the config does not capture (invalidates the cache).
CODE_VERSION = "tiny-v1"
MARKER = "bootstrap.json"
#: The report's pass@k: samples per problem at T=1 and the ks (unbiased estimator over those samples).
PASS_K_SAMPLES, PASS_K = 16, (1, 4, 16)
PASS_K_PROMPTS = 256
log = logging.getLogger("covrl.tiny_model")


def cache_key(cfg: TinyModelConfig, task_cfg: TaskConfig) -> str:
    """Hash of everything that determines the built model (the wall-clock cap ``max_seconds`` does not).

    Differs per task (and per task setting), so models of different tasks coexist in the cache."""
    model = cfg.model_dump(exclude={"max_seconds"})
    identity = task_spec(task_cfg).cache_identity(task_cfg)
    return settings_key({"model": model, "task": identity, "code": CODE_VERSION})


def ensure_tiny_model(cfg: TinyModelConfig, task: TaskConfig, *, progress: bool = True) -> Path:
    """Path of the warm-started tiny model for these settings, building it once if not cached.

    Safe under concurrency: the build holds ``<key>.lock`` and publishes by an atomic rename; a waiting
    process finds the finished directory after the lock is released.
    """
    return ensure_built(
        "tiny", cache_key(cfg, task), MARKER, lambda tmp: build_tiny_model(cfg, task, tmp, progress=progress)
    )


def build_tiny_model(
    cfg: TinyModelConfig, task_cfg: TaskConfig, out_dir: Path, *, progress: bool = True
) -> dict:
    """Build, warm-start and save the model into ``out_dir``; returns (and writes) the bootstrap report."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(cfg, task_cfg, Path(out_dir), progress=progress)
    finally:
        torch.set_num_threads(prev_threads)


def new_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised tied-embedding Llama sized by ``cfg`` for ``tokenizer``'s vocabulary."""
    mcfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(mcfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def encode_sft(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], responses: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for ``<s> prompt response </s>``, right-padded; labels are -100 off the response.

    Tokenised in one batched call; masks are built with array ops, not per-row loops.
    """
    prompt_len = np.array([len(x) for x in tokenizer(prompts)["input_ids"]])
    full = tokenizer([p + r for p, r in zip(prompts, responses, strict=True)])["input_ids"]
    length = np.array([len(x) for x in full])
    ids = np.full((len(full), length.max() + 1), tokenizer.pad_token_id, dtype=np.int64)
    pos = np.arange(ids.shape[1])[None, :]
    ids[pos < length[:, None]] = np.concatenate(full)
    ids[np.arange(len(full)), length] = tokenizer.eos_token_id
    labels = np.where((pos >= prompt_len[:, None]) & (pos <= length[:, None]), ids, -100)
    return torch.from_numpy(ids), torch.from_numpy(labels)


def _build(cfg: TinyModelConfig, task_cfg: TaskConfig, out_dir: Path, *, progress: bool) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    say = _reporter(progress)
    torch.manual_seed(cfg.seed)
    spec = task_spec(task_cfg)
    max_new = spec.max_response_chars(task_cfg) + 2
    tokenizer = build_char_tokenizer(spec.symbols, max_length=cfg.max_position_embeddings)
    model = new_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    prompts, responses = spec.make_sft_texts(task_cfg, "train")
    held_out = spec.make_rows(task_cfg, "eval")
    stop_rows = held_out[: cfg.eval_prompts]
    ref_prompts, ref_responses, ref_groups = spec.reference_texts(task_cfg, "eval")
    n_ref = sum(g < cfg.eval_prompts for g in ref_groups)  # problem indices ascend: a prefix
    stop_tf = encode_sft(tokenizer, ref_prompts, ref_responses)
    stop_tf = (stop_tf[0][:n_ref], stop_tf[1][:n_ref])
    stop_groups = ref_groups[:n_ref] if len(set(ref_groups)) < len(ref_groups) else None
    say(
        f"tiny model: {n_params / 1e6:.2f}M params, {len(prompts)} SFT examples, target pass@1 >= {cfg.stop_at}"
    )

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr)
    warm = max(cfg.sft_warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    rng = np.random.default_rng(cfg.seed)
    order, cursor = rng.permutation(len(prompts)), 0
    history: list[dict] = []
    snapshot = None  # (step, model state, optimizer state, scheduler state) at the last eval below stop_at
    every, refined, step, stop_acc, loss = cfg.eval_every, False, 0, None, float("nan")
    model.train()
    while step < cfg.max_sft_steps:
        if cursor + cfg.sft_batch_size > len(order):
            order, cursor = rng.permutation(len(prompts)), 0
        idx = order[cursor : cursor + cfg.sft_batch_size].tolist()
        cursor += cfg.sft_batch_size
        batch_ids, batch_labels = encode_sft(
            tokenizer, [prompts[i] for i in idx], [responses[i] for i in idx]
        )
        mask = (batch_ids != tokenizer.pad_token_id).long()
        out = model(input_ids=batch_ids, attention_mask=mask, labels=batch_labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        step, loss = step + 1, out.loss.item()
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds
        if step % every and step < cfg.max_sft_steps and not out_of_time:
            continue
        expected = expected_pass_at_1(model, *stop_tf, pad_id=tokenizer.pad_token_id, groups=stop_groups)
        sampled = None
        if expected >= cfg.stop_at - cfg.sampled_eval_margin:
            sampled = evaluate_pass_at_1(
                model,
                tokenizer,
                stop_rows,
                max_new_tokens=max_new,
                seed=cfg.seed + step,
                score=spec.score_response,
            )
        acc = sampled if sampled is not None else expected
        history.append(
            {"step": step, "loss": round(loss, 4), "expected_pass_at_1": expected, "pass_at_1": sampled}
        )
        shown = f"{sampled:.3f}" if sampled is not None else "  -  "
        say(
            f"  sft step {step:4d}  loss {loss:.4f}  held-out pass@1(T=1): expected {expected:.3f}, "
            f"sampled {shown}  {time.perf_counter() - t0:.0f}s"
        )
        if acc > cfg.target_high and snapshot is not None and not refined:
            # Overshot the band between two evaluations: go back and evaluate every step from there.
            step, msd, osd, ssd = snapshot
            model.load_state_dict(msd)
            opt.load_state_dict(osd)
            sched.load_state_dict(ssd)
            every, refined = 1, True
            say(f"  pass@1 {acc:.3f} overshot {cfg.target_high}: back to step {step}, evaluating every step")
            continue
        if sampled is not None and sampled >= cfg.stop_at:
            stop_acc = sampled
            break
        snapshot = (
            step,
            copy.deepcopy(model.state_dict()),
            copy.deepcopy(opt.state_dict()),
            sched.state_dict(),
        )
        if out_of_time:
            break
    sft_seconds = time.perf_counter() - t0
    last = 0.0
    if history:
        last = (
            history[-1]["pass_at_1"]
            if history[-1]["pass_at_1"] is not None
            else history[-1]["expected_pass_at_1"]
        )
    if stop_acc is None and not cfg.target_low <= last <= cfg.target_high:
        raise RuntimeError(
            f"tiny-model warm start ended after {step} steps / {sft_seconds:.0f}s at held-out pass@1 {last:.3f}, "
            f"outside [{cfg.target_low}, {cfg.target_high}]: raise model.tiny.max_sft_steps / max_seconds, "
            "or lower model.tiny.eval_every"
        )
    final_rows = held_out[: cfg.final_eval_prompts]
    final = evaluate_pass_at_1(
        model, tokenizer, final_rows, max_new_tokens=max_new, seed=cfg.seed + 10**6, score=spec.score_response
    )
    greedy = evaluate_pass_at_1(
        model, tokenizer, final_rows, max_new_tokens=max_new, temperature=0.0, score=spec.score_response
    )
    k_rows = held_out[: min(PASS_K_PROMPTS, cfg.final_eval_prompts)]
    pass_k = evaluate_pass_at_k(
        model,
        tokenizer,
        k_rows,
        samples=PASS_K_SAMPLES,
        ks=PASS_K,
        max_new_tokens=max_new,
        score=spec.score_response,
        seed=cfg.seed + 2 * 10**6,
    )
    report = {
        "pass_at_1_t1": final,
        "pass_at_1_greedy": greedy,
        "pass_at_1_t1_at_stop": stop_acc if stop_acc is not None else last,
        "eval_prompts_final": len(final_rows),
        "pass_at_k_t1": {str(k): v for k, v in pass_k.items()},  # unbiased, PASS_K_SAMPLES per problem
        "pass_at_k_problems": len(k_rows),
        "in_band": cfg.target_low <= final <= cfg.target_high,
        "sft_steps": step,
        "sft_seconds": round(sft_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(
            time.process_time() - cpu0, 2
        ),  # wall time on idle cores ~ cpu_seconds / threads
        "n_params": n_params,
        "history": history,
        "key": cache_key(cfg, task_cfg),
        "code_version": CODE_VERSION,
        "tiny_model": cfg.model_dump(),
        "task": task_cfg.model_dump(),
        "torch_threads": torch.get_num_threads(),
    }
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(json.dumps(report, indent=2))
    say(
        f"tiny model ready: held-out pass@1(T=1) {final:.3f} on {len(final_rows)} problems "
        f"(greedy {greedy:.3f}; pass@k {', '.join(f'@{k} {v:.3f}' for k, v in pass_k.items())} on "
        f"{len(k_rows)} x {PASS_K_SAMPLES}), {step} SFT steps, {report['total_seconds']:.0f}s"
    )
    if not report["in_band"]:
        log.warning("tiny model final pass@1 %.3f is outside the target band", final)
    return report


def _reporter(progress: bool):
    def say(msg: str) -> None:
        log.info(msg)
        if progress:
            print(msg, file=sys.stderr, flush=True)

    return say
