"""Small helpers shared by tests (not part of covrl)."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from schemas.batches import Ragged, TrainBatch, ragged_positions
from schemas.config import BUILTIN_LOSSES, PolicyLossBase


def loss_cfg(name: str = "ppo", **fields: Any) -> PolicyLossBase:
    """The ``name`` loss's config from settings shared by parametrized tests: fields the loss does not have
    are left out (each loss config refuses other losses' fields)."""
    cls = BUILTIN_LOSSES[name]
    return cls(name=name, **{k: v for k, v in fields.items() if k in cls.model_fields})


def synthetic_train_batch(
    n: int,
    *,
    seed: int = 0,
    prompt_len: tuple[int, int] = (2, 6),
    response_len: tuple[int, int] = (1, 9),
    vocab: tuple[int, int] = (3, 24),
    group_size: int = 4,
    adv_scale: float = 1.0,
    sampler_logprob: float = -3.0,
    loss_mask: np.ndarray | None = None,
) -> TrainBatch:
    """A random TrainBatch for tests and benchmarks: per row, prompt and response lengths drawn from the
    half-open ranges, token ids from ``vocab``, normal advantages; rows grouped ``group_size`` at a time."""
    rng = np.random.default_rng(seed)
    seqs, plen = [], []
    for _ in range(n):
        p, r = int(rng.integers(*prompt_len)), int(rng.integers(*response_len))
        seqs.append(rng.integers(*vocab, size=p + r).tolist())
        plen.append(p)
    sequences = Ragged.from_lists(seqs)
    response_tokens = int(sequences.values.shape[0] - sum(plen))
    return TrainBatch(
        step=1,
        policy_version=0,
        sequences=sequences,
        prompt_lengths=np.array(plen, np.int32),
        advantages=(rng.normal(size=n) * adv_scale).astype(np.float32),
        sampler_logprobs=np.full(response_tokens, sampler_logprob, np.float32),
        prompt_index=np.repeat(np.arange(n // group_size), group_size).astype(np.int64),
        loss_mask=loss_mask,
    )


def take_rows(batch: TrainBatch, rows: np.ndarray) -> TrainBatch:
    """Rows ``rows`` of ``batch`` as a new batch, the flat per-token arrays following them."""
    rows = np.asarray(rows, dtype=np.int64)
    flat = ragged_positions(batch.response_offsets, rows)
    return TrainBatch(
        step=batch.step,
        policy_version=batch.policy_version,
        sequences=batch.sequences.take(rows),
        prompt_lengths=batch.prompt_lengths[rows],
        advantages=batch.advantages[rows],
        sampler_logprobs=batch.sampler_logprobs[flat],
        ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[flat],
        loss_mask=None if batch.loss_mask is None else batch.loss_mask[rows],
        prompt_index=batch.prompt_index[rows],
    )


# ------------------------------------------------------------------ tiny models and trainables


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).float()


def random_batch(n=24, seed=0):
    return synthetic_train_batch(n, seed=seed)


class SGDTrainable:
    def __init__(self, model, lr=0.5):
        self.module = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()
        return None


class _OneHot(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(input_ids, self.vocab).float())


class LookupPolicy(torch.nn.Module):
    """logits(next | current token j) = head.weight[:, j]; ``base_model`` gives one-hot hidden states."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.base_model = _OneHot(vocab)
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        torch.nn.init.zeros_(self.head.weight)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.head(self.base_model(input_ids).last_hidden_state))


class SGD:
    def __init__(self, model):
        self.module = model
        self.backward_calls = 0

    def backward(self, loss):
        self.backward_calls += 1
        loss.backward()

    def step(self):
        return None


def chain_case(lengths, advantages, current, old):
    """A batch of rows ``[prompt, r_1 .. r_n]`` with token ids that never repeat, and a policy whose
    log-prob of each response token is ``current`` (flat, row by row): with vocabulary V and every other
    logit 0, ``log p = x - log(e^x + V - 1)``, so ``x = log(p (V - 1) / (1 - p))``."""
    seqs, start = [], 0
    for n in lengths:
        seqs.append(list(range(start, start + n + 1)))
        start += n + 1
    vocab = start
    model = LookupPolicy(vocab)
    flat = iter(current)
    with torch.no_grad():
        for row in seqs:
            for j, nxt in zip(row[:-1], row[1:]):
                p = math.exp(next(flat))
                model.head.weight[nxt, j] = math.log(p * (vocab - 1) / (1 - p))
    batch = TrainBatch(
        step=1,
        policy_version=0,
        sequences=Ragged.from_lists(seqs),
        prompt_lengths=np.ones(len(lengths), np.int32),
        advantages=np.asarray(advantages, np.float32),
        sampler_logprobs=np.asarray(old, np.float32),
        prompt_index=np.zeros(len(lengths), np.int64),
    )
    return model, batch


def assert_logprobs_agree(metric_rows: list[dict], tol: float = 1e-3) -> None:
    """At every step, vLLM's log-probs of the sampled tokens match the learner's recomputation (fp32).

    From step 2 on the generator samples with weights pushed by the weight sync, so this is the check that
    the sync delivered the learner's weights (a skipped sync gives differences of order 1)."""
    for row in metric_rows:
        assert row["mismatch/logprob_abs_max"] <= tol, (row["step"], row["mismatch/logprob_abs_max"])


def wandb_records(run_root: Any) -> list[dict[str, Any]]:
    """Every record of the one offline W&B run under ``run_root/wandb/``, read with wandb's own reader
    (``wandb leet inspect --json``), as dicts with a ``type`` ('run', 'history', ...)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    (wandb_file,) = (Path(run_root) / "wandb").glob("offline-run-*/run-*.wandb")
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def state_address() -> str:
    """The state-API address of the Ray this process is connected to. Ray's state API otherwise looks for
    the cluster on the machine and refuses when it finds several (another session's run, a study)."""
    import ray._private.worker as worker

    return "http://" + worker.get_dashboard_url()
