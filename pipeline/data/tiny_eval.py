"""Held-out evaluation of the tiny model with HF ``generate``: sampled pass@1 and pass@k, and the
teacher-forced expected pass@1 the bootstrap uses to decide when sampling is worth its cost.

Task-agnostic: the task's scorer is passed in (``score(response, ground_truth) -> (reward, reason)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.core.pass_at_k import pass_at_k
from pipeline.data import addition as task


@torch.no_grad()
def evaluate_pass_at_1(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 512,
    score: Callable[[str, str], tuple[float, str | None]] = task.score_response,
) -> float:
    """Fraction of ``rows`` solved with one sample each (``temperature`` 0 = greedy), via HF ``generate``;
    ``score`` is the task's scorer (default: addition's)."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    solved = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            **(sample if temperature > 0 else {"do_sample": False}),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        solved += sum(score(t, r["ground_truth"])[0] for t, r in zip(texts, chunk, strict=True))
    model.train(was_training)
    return solved / max(len(rows), 1)


@torch.no_grad()
def evaluate_pass_at_k(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict],
    *,
    samples: int,
    ks: Sequence[int],
    max_new_tokens: int,
    score: Callable[[str, str], tuple[float, str | None]],
    seed: int = 0,
    batch_size: int = 512,
) -> dict[int, float]:
    """Mean unbiased pass@k over ``rows`` for each k in ``ks``, from ``samples`` samples per row at T=1."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    correct = np.zeros((len(rows), samples), dtype=bool)
    per_batch = max(batch_size // samples, 1)
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=samples,  # grouped per prompt: row j // samples
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for j, text in enumerate(texts):
            row, sample = divmod(j, samples)
            correct[start + row, sample] = score(text, chunk[row]["ground_truth"])[0] >= 1.0
    model.train(was_training)
    return {k: pass_at_k(correct, k) for k in ks}


@torch.no_grad()
def expected_pass_at_1(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    pad_id: int,
    batch_size: int = 512,
    groups: Sequence[int] | None = None,
) -> float:
    """Mean probability of sampling a reference response at T=1 (teacher-forced, one forward pass).

    Why: it is the exact expected pass@1 of the reference solutions, with no sampling noise, at a fraction
    of the cost of generation; it slightly underestimates pass@1 (a wrong chain can still end in the right
    answer), so the stop decision is confirmed by a sampled evaluation. ``groups`` (problem index per row)
    sums the probabilities of a problem's solutions (distinct texts: disjoint events), then averages over
    problems; None = one reference per problem.
    """
    was_training = model.training
    model.eval()
    probs = []
    for start in range(0, len(input_ids), batch_size):
        ids, lab = input_ids[start : start + batch_size], labels[start : start + batch_size]
        logits = model(input_ids=ids, attention_mask=(ids != pad_id).long()).logits[:, :-1].float()
        tgt = lab[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        probs.append(torch.exp((logp * (tgt != -100)).sum(-1)))
    model.train(was_training)
    if not probs:
        return 0.0
    if groups is None:
        return float(torch.cat(probs).mean())
    index = torch.as_tensor(list(groups))
    per_problem = torch.zeros(int(index.max()) + 1).index_add_(0, index, torch.cat(probs))
    return float(per_problem.mean())
