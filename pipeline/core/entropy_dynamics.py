"""Entropy dynamics of a softmax policy: exact change, the first-order covariance law, and the
batch-level estimate the paper tracks during training (Cui et al. 2025, entropy-dynamics lemma).

Per state s with logits z and pi = softmax(z), the paper's lemma (first order in the logit step):

    H(s | z') - H(s | z) ~ -Cov_{a ~ pi}( log pi(a|s), z'(s,a) - z(s,a) )

Under natural policy gradient the logit step is ``eta * A(s, a)``, so ``dH ~ -eta * Cov(log pi, A)``;
under vanilla PG it is ``eta * pi(a|s) * A(s, a)``. RL training only sees the sampled actions, so the
batch estimate replaces the expectation under pi by the empirical covariance over sampled tokens
(or, as in the paper's check, over the responses of each prompt with length-normalised log-probs).

Deviations: none from the paper's formulas; the per-group estimate weighs every group equally
(groups of size 1 contribute 0 covariance), which is how we read "averaged over the batch".
"""

from __future__ import annotations

import numpy as np
import torch

Tensor = torch.Tensor


def _wide(x: Tensor) -> Tensor:
    """fp32 at least (fp64 stays fp64, so tests can check the O(step^2) error precisely)."""
    return x if x.dtype == torch.float64 else x.float()


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Softmax entropy (...,) of logits (..., V), fp32 or wider (full vocab: for small V / tests)."""
    logp = torch.log_softmax(_wide(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def exact_entropy_change(logits_before: Tensor, logits_after: Tensor) -> Tensor:
    """True ``H(softmax(after)) - H(softmax(before))`` per state: (..., V) x 2 -> (...)."""
    return entropy_from_logits(logits_after) - entropy_from_logits(logits_before)


def first_order_entropy_change(logits_before: Tensor, logits_after: Tensor) -> Tensor:
    """The lemma's prediction ``-Cov_{a~pi}(log pi(a), dz(a))`` per state, pi = softmax(before).

    ``Cov = E[log pi * dz] - E[log pi] E[dz]`` with expectations under pi; exact to first order in
    ``dz = after - before`` (the error is O(|dz|^2)). Shapes (..., V) x 2 -> (...).
    """
    logp = torch.log_softmax(_wide(logits_before), dim=-1)
    p = logp.exp()
    dz = _wide(logits_after - logits_before)
    e_logp, e_dz = (p * logp).sum(-1), (p * dz).sum(-1)
    cov = (p * logp * dz).sum(-1) - e_logp * e_dz
    return -cov


def tabular_pg_entropy_change(
    logits: Tensor, labels: Tensor, advantages: Tensor, temperature: float = 1.0
) -> Tensor:
    """Per state, the lemma's first-order entropy change per unit step when the logits themselves are the
    parameters (a lookup-table softmax policy) and one plain gradient step is taken on ``-A * log pi(label)``.

    The step moves the raw logits by ``dz = A (onehot(label) - pi) / T`` (pi = softmax(z / T)), so the
    change is ``-Cov_pi(log pi, dz / T) = -A Cov_pi(log pi, onehot(label) - pi) / T^2``: the sampled-action
    form of the vanilla-PG term ``-Cov(log pi, pi A)``. A network shares parameters between states, so its
    real step is this one filtered through its tangent kernel; ``pipeline.core.entropy_probe`` measures both.
    Shapes (N, V), (N,), (N,) -> (N,).
    """
    logp = torch.log_softmax(_wide(logits) / temperature, dim=-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1)
    centred = logp + ent[:, None]  # log pi - E[log pi]
    cov = centred.gather(-1, labels[:, None]).squeeze(-1) * p.gather(-1, labels[:, None]).squeeze(-1) - (
        p * p * centred
    ).sum(-1)
    return -_wide(advantages) * cov / temperature**2


@torch.no_grad()
def predicted_entropy_change(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, lr_scale: float = 1.0, *, form: str = "natural"
) -> Tensor:
    """Batch estimate ``-lr_scale * Cov(log pi, A)`` over valid tokens (natural-PG form).

    ``form="vanilla"`` uses ``Cov(log pi, pi * A)`` instead (vanilla-PG logit step). Inputs (N, T)
    (or any shape, all alike); returns a 0-dim tensor. Positive covariance -> entropy falls.
    """
    m = mask.bool()
    lp, a = logprobs.detach().float()[m], advantages.detach().float()[m]
    if form == "vanilla":
        a = a * lp.exp()
    elif form != "natural":
        raise ValueError(f"form must be 'natural' or 'vanilla', got {form!r}")
    if lp.numel() == 0:
        return torch.zeros((), device=logprobs.device)
    cov = ((lp - lp.mean()) * (a - a.mean())).mean()
    return -lr_scale * cov


@torch.no_grad()
def predicted_entropy_change_by_group(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, prompt_index, lr_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The paper's check: prompt = state, response = action, length-normalised log-probs.

    Per response i: ``lp_i = mean_t logp_{i,t}``, ``A_i = mean_t A_{i,t}`` (the sequence advantage
    when it is broadcast). Per group g: ``cov_g = mean_{i in g} (A_i - mean_g A)(lp_i - mean_g lp)``.
    Returns ``(-lr_scale * mean_g cov_g, cov_g per group (n_groups,))``, groups in sorted id order.
    """
    m = mask.bool().float()
    length = m.sum(-1).clamp(min=1)
    lp = (logprobs.detach().float() * m).sum(-1) / length
    a = (advantages.detach().float() * m).sum(-1) / length
    ids = prompt_index.cpu().numpy() if isinstance(prompt_index, Tensor) else np.asarray(prompt_index)
    _, inv = np.unique(ids, return_inverse=True)
    idx = torch.as_tensor(inv.reshape(-1), dtype=torch.long, device=lp.device)
    n_groups = int(idx.max()) + 1 if idx.numel() else 0

    def group_mean(x: Tensor) -> Tensor:
        tot = torch.zeros(n_groups, device=x.device).index_add_(0, idx, x)
        cnt = torch.zeros(n_groups, device=x.device).index_add_(0, idx, torch.ones_like(x))
        return tot / cnt.clamp(min=1)

    cov_g = group_mean((a - group_mean(a)[idx]) * (lp - group_mean(lp)[idx]))
    est = -lr_scale * cov_g.mean() if n_groups else torch.zeros((), device=lp.device)
    return est, cov_g
