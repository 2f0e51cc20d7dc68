"""Claim 3 tested where the theory applies: one plain SGD step, measured exactly, beside -eta * Cov.

The entropy law of the paper (``pipeline.core.entropy_dynamics``) is first order in one small policy-gradient
step; the run's own updates (Adam, several mini-batches, clipping) are far from that regime, so their
per-step entropy change tracks the covariance only loosely. The probe takes the current weights and the
step's on-policy batch, computes the gradient of the on-policy policy-gradient loss
``-sum_t A_t log pi_t / n_tokens`` (what PPO's surrogate is at ratio 1), and for each small learning
rate ``eta`` applies ``theta - eta * g``, measures the exact change of the mean token entropy on the same
batch (teacher-forced, full distribution at every response position), and restores the weights
bit-for-bit. Nothing of it reaches the run: the gradient is taken with ``torch.autograd.grad`` (no
``.grad`` is touched, no optimizer or engine state) and the weights are copied back.

Logged beside the measured change, from the same batch and weights, two first-order terms per unit lr
that split the gap between the measured change and the covariance law into its causes:
- ``probe/dH_linear``: ``-grad(H) . g``, the exact first-order change of the network's step (the measured
  ``dH@lr / lr`` tends to it as lr -> 0; what remains at a probed lr is curvature);
- ``probe/dH_tabular``: the same step if every response position's logits were free parameters (the
  lemma's lookup-table softmax, ``entropy_dynamics.tabular_pg_entropy_change``); ``dH_linear`` differs
  from it only through parameter sharing (the network's tangent kernel couples positions). Both cost
  about a third of a probe (one more backward, one more no-grad forward; bench/README.md);
and the batch estimates the paper tracks:
- ``probe/cov_token``: ``Cov(log pi, A)`` over response tokens (natural-PG form: dH ~ -eta Cov);
- ``probe/cov_token_vanilla``: ``Cov(log pi, pi * A)`` (vanilla-PG logit step);
- ``probe/cov_group``: the paper's check, per prompt group over its responses with length-normalised
  log-probs, averaged over groups.
The probe batch is the step's own rollout batch: the law is about samples of the current policy, and a
batch kept fixed across the run would drift off-policy as the policy moves. Within a probe the batch is
fixed (every eta measures the same sequences). ``pipeline.analysis.study`` correlates measured and predicted
changes over a run's probes, per eta.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.core.entropy_dynamics import (
    predicted_entropy_change,
    predicted_entropy_change_by_group,
    tabular_pg_entropy_change,
)
from pipeline.core.model_forward import (
    MicroBatch,
    batch_logprobs,
    make_micro_batch,
    micro_batches,
    response_logprobs,
)
from schemas.batches import TrainBatch


def lr_key(lr: float) -> str:
    """Metric name of the measured change at ``lr``: ``probe/dH@lr0.003``."""
    return f"probe/dH@lr{lr:g}"


def sgd_entropy_probe(
    model: torch.nn.Module,
    batch: TrainBatch,
    *,
    lrs: Sequence[float],
    temperature: float,
    micro_batch_size: int,
    full_logits: bool = False,
) -> dict[str, float]:
    """``probe/*`` metrics of one SGD step per lr in ``lrs`` from ``model``'s weights (left unchanged)."""
    rows = np.arange(len(batch))
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = dict(micro_batch_size=micro_batch_size, temperature=temperature, full_logits=full_logits)
    was_training = model.training
    model.eval()
    try:
        logp0, ent0 = batch_logprobs(model, batch, rows, with_entropy=True, **fwd)
        grads, entropy_grads = _batch_gradients(model, batch, params, **fwd)
        linear = -sum(
            float((g * h).sum(dtype=torch.float64)) for g, h in zip(grads, entropy_grads, strict=True)
        )
        tabular = _tabular_change(model, batch, **fwd)
        saved = [p.detach().clone() for p in params]
        out = {
            "probe/entropy_before": float(ent0.mean()),
            "probe/dH_linear": linear,
            "probe/dH_tabular": tabular,
        }
        for lr in lrs:
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g.to(p.dtype), alpha=lr)
            _, ent1 = batch_logprobs(model, batch, rows, with_entropy=True, **fwd)
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            # per-token differences first: the change is orders of magnitude below the entropy itself
            out[lr_key(lr)] = float(np.mean(ent1.astype(np.float64) - ent0.astype(np.float64)))
    finally:
        model.train(was_training)
    grad_sq = sum(float(g.float().square().sum()) for g in grads)
    return out | {"probe/grad_norm": grad_sq**0.5} | _covariances(batch, logp0)


def _batch_gradients(
    model, batch: TrainBatch, params, *, temperature: float, micro_batch_size: int, full_logits: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """d/dtheta over the batch, accumulated over micro-batches, of the on-policy PG loss
    ``-sum_t A_t log pi_t / n_tokens`` and of the mean token entropy, from one forward per micro-batch."""
    n_tokens = max(int(batch.response_lengths.sum()), 1)
    pg = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    ent_grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for part in micro_batches(np.arange(len(batch)), micro_batch_size):
        mb = make_micro_batch(batch, part)
        with torch.enable_grad():
            lp, ent = response_logprobs(
                model, mb, temperature=temperature, with_entropy=True, full_logits=full_logits
            )
            adv = torch.from_numpy(batch.advantages[part])[:, None] * mb.response_mask
            pg_loss = -(adv * lp).sum() / n_tokens
            ent_mean = (ent * mb.response_mask).sum() / n_tokens
            pg_parts = torch.autograd.grad(pg_loss, params, allow_unused=True, retain_graph=True)
            ent_parts = torch.autograd.grad(ent_mean, params, allow_unused=True)
        for accs, parts in ((pg, pg_parts), (ent_grads, ent_parts)):
            for acc, g in zip(accs, parts, strict=True):
                if g is not None:
                    acc.add_(g.float())
    return pg, ent_grads


@torch.no_grad()
def _tabular_change(
    model,
    batch: TrainBatch,
    *,
    temperature: float,
    micro_batch_size: int,
    full_logits: bool,
    chunk: int = 1024,
) -> float:
    """First-order mean-entropy change per unit lr of the probe's step on a lookup-table policy: each response
    position's logits move by ``-d loss / dz`` alone, so the change is ``sum_t tabular_t / n_tokens^2``."""
    n_tokens = max(int(batch.response_lengths.sum()), 1)
    total = 0.0
    for part in micro_batches(np.arange(len(batch)), micro_batch_size):
        mb = make_micro_batch(batch, part)
        labels = mb.labels[mb.response_mask]
        adv = (torch.from_numpy(batch.advantages[part])[:, None] * mb.response_mask)[mb.response_mask]
        for start, logits in _response_logits(model, mb, full_logits=full_logits, chunk=chunk):
            sl = slice(start, start + logits.shape[0])
            total += float(tabular_pg_entropy_change(logits, labels[sl], adv[sl], temperature).sum())
    return total / n_tokens**2


def _response_logits(model, mb: MicroBatch, *, full_logits: bool, chunk: int):
    """``(offset, logits)`` chunks of the full next-token logits at ``mb``'s response positions (flat order)."""
    mask = mb.response_mask
    if full_logits:
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
    else:
        out = model.base_model(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False
        ).last_hidden_state
    picked = out[torch.arange(out.shape[0])[:, None], mb.positions][mask]
    weight = None if full_logits else model.get_output_embeddings().weight
    for start in range(0, picked.shape[0], chunk):
        part = picked[start : start + chunk]
        yield start, part if weight is None else part @ weight.t()


def _covariances(batch: TrainBatch, logp: np.ndarray) -> dict[str, float]:
    """The three covariance forms of the law on (the step-start log-probs, the sequence advantages)."""
    r_len = batch.response_lengths
    lp = torch.from_numpy(logp)
    adv = torch.from_numpy(np.repeat(batch.advantages, r_len).astype(np.float32))
    flat_mask = torch.ones_like(lp, dtype=torch.bool)
    # padded (N, T) layout for the per-group form
    n, t = len(batch), int(r_len.max()) if len(batch) else 0
    mask = torch.from_numpy(np.arange(t)[None, :] < r_len[:, None])
    lp2 = torch.zeros(n, t).masked_scatter(mask, lp)
    a2 = torch.tensor(batch.advantages)[:, None].expand(n, t) * mask
    group, _ = predicted_entropy_change_by_group(lp2, a2, mask, batch.prompt_index)
    return {
        "probe/cov_token": -float(predicted_entropy_change(lp, adv, flat_mask)),
        "probe/cov_token_vanilla": -float(predicted_entropy_change(lp, adv, flat_mask, form="vanilla")),
        "probe/cov_group": -float(group),
    }
