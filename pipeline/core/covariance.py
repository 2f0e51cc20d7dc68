"""The per-token covariance that drives Clip-Cov and KL-Cov, its statistics, and the two selection rules.

Per valid token, ``cov_i = (A_i - mean A) * (logp_i - mean logp)`` with means over valid tokens and logp the
current policy's (detached) log-prob (Cui et al. 2025, the per-token Cov of Clip-Cov / KL-Cov). Its mean
over tokens is the batch covariance that the natural-PG entropy law ``dH ~ -eta * Cov(log pi, A)``
predicts entropy with (``pipeline.core.entropy_dynamics``).
"""

from __future__ import annotations

import torch

from pipeline.core.aggregation import masked_mean

Tensor = torch.Tensor


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def token_covariance(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    adv_mean: float | Tensor | None = None,
    logp_mean: float | Tensor | None = None,
) -> Tensor:
    """Per-token ``cov_i = (A_i - mean A) * (logp_i - mean logp)``, detached, 0 on padding.

    Computed in fp32 (fp64 inputs stay fp64). Means are over the valid tokens of this batch unless given (pass global means when the batch
    is one shard of a larger mini-batch). Any shape; ``mask`` has the same shape.
    """
    m = mask.bool()
    a, lp = _wide(advantages.detach()), _wide(logprobs.detach())
    a_mu = masked_mean(a, m) if adv_mean is None else adv_mean
    lp_mu = masked_mean(lp, m) if logp_mean is None else logp_mean
    cov = (a - a_mu) * (lp - lp_mu)
    return torch.where(m, cov, 0.0)


def select_clip_cov(
    cov: Tensor,
    candidate_mask: Tensor,
    n_valid: int,
    config,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Clip-Cov selection: ``max(1, int(r * n_valid))`` tokens drawn uniformly (all if fewer) among
    candidates with ``lb < cov < ub``. Returns a bool mask shaped like ``cov``."""
    band = candidate_mask.bool() & (cov > config.clip_cov_lb) & (cov < config.clip_cov_ub)
    k = max(1, int(config.clip_cov_ratio * n_valid))
    n_band = int(band.sum())
    if n_band <= k:  # all candidates; skips the index work in the common tiny-band case
        return band
    idx = band.reshape(-1).nonzero().squeeze(-1)
    dev = generator.device if generator is not None else idx.device
    perm = torch.randperm(n_band, generator=generator, device=dev).to(idx.device)
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    selected[idx[perm[:k]]] = True
    return selected.reshape(cov.shape)


def select_kl_cov(cov: Tensor, mask: Tensor, n_valid: int, config) -> Tensor:
    """KL-Cov selection: the top ``max(1, int(k * n_valid))`` valid tokens by ``cov`` (bool mask)."""
    m = mask.bool()
    k = min(max(1, int(config.kl_cov_ratio * n_valid)), int(m.sum()))
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if k > 0:
        scores = torch.where(m, cov, torch.full_like(cov, -torch.inf)).reshape(-1)
        selected[scores.topk(k).indices] = True
    return selected.reshape(cov.shape)


@torch.no_grad()
def covariance_stats(cov: Tensor, mask: Tensor, selected: Tensor | None = None) -> dict[str, Tensor]:
    """``cov/{mean,p50,p99,max,frac_positive,selected_frac}`` over valid tokens (0-dim tensors).

    Percentiles are nearest-rank order statistics (``kthvalue`` / ``topk``, no full sort).
    """
    m = mask.bool()
    vals = cov[m]
    n = vals.numel()
    zero = cov.new_zeros(())
    sel = zero if selected is None else (selected.bool() & m).sum() / max(n, 1)
    if n == 0:
        names = ("cov/mean", "cov/p50", "cov/p99", "cov/max", "cov/frac_positive")
        return dict.fromkeys(names, zero) | {"cov/selected_frac": sel}
    i50, i99 = (n - 1) // 2, min(n - 1, int(0.99 * (n - 1) + 0.5))
    top = vals.topk(n - i99).values  # descending: top[0] = max, top[-1] = p99
    return {
        "cov/mean": vals.mean(),
        "cov/p50": vals.kthvalue(i50 + 1).values,
        "cov/p99": top[-1],
        "cov/max": top[0],
        "cov/frac_positive": (vals > 0).sum() / n,
        "cov/selected_frac": sel,
    }
