"""Policy losses (PPO, Clip-Cov, KL-Cov), loss aggregation, entropy bonus and KL penalty.

Every registered policy loss has one signature::

    fn(log_prob, old_log_prob, advantages, response_mask, config, *,
       normalizer=None, selected=None, generator=None, token_weights=None) -> (loss, stats)

with (N, T) per-token tensors (N responses padded to T tokens; advantages already broadcast to
tokens), ``config`` a :class:`schemas.config.PolicyLossConfig`, ``loss`` a scalar to minimise and
``stats`` a dict of detached 0-dim tensors with stable names.
``token_weights`` (optional, (N, T), treated as constants) multiply each token's policy loss before
aggregation -- the truncated importance-sampling correction for sampler/learner mismatch
(``pipeline.core.recipe.truncated_is_weights``). Callers pass it only when set, so losses registered
without the keyword keep working.

The covariance that drives Clip-Cov and KL-Cov (Cui et al. 2025, the per-token Cov(y_i) of Clip-Cov / KL-Cov) is, per
valid token, ``cov_i = (A_i - mean A) * (logp_i - mean logp)`` with means over valid tokens and
logp the current policy's (detached) log-prob. Its mean over tokens is the batch covariance that the
natural-PG entropy law ``dH ~ -eta * Cov(log pi, A)`` predicts entropy with (see entropy_dynamics).

Global selection (deviation from the reference, which picks tokens per micro-batch on each GPU,
verl issue #7829): the learner runs :func:`select_tokens` once on the whole optimizer mini-batch
(all micro-batches; on several ranks, with global means via ``token_covariance(adv_mean=...,
logp_mean=...)`` and the global ``n_valid``) and passes each micro-batch its slice of the boolean
``selected`` mask plus the global ``normalizer`` (see :func:`loss_normalizer`). The sum of the
micro-batch losses -- and so the gradient -- is then the same however the batch is split. With
``selected=None`` a loss selects inside the batch it is given (reference behaviour).

Other deviations from verl (volcengine/verl ``core_algos.py``):
- ``clip_ratio_c=None`` disables dual clip (verl always applies it, default 3.0). When it is set,
  Clip-Cov applies it too, and dual-clipped tokens are not Clip-Cov candidates (verl's Clip-Cov has
  no dual clip). Identical to verl when ``clip_ratio_c`` is None.
- Clip-Cov's ``pg_clipfrac`` is the PPO clip fraction; the detached fraction is ``cov/selected_frac``
  (verl reports the detached fraction as ``pg_clipfrac``). KL-Cov's ``ppo_kl`` is the signed approx
  KL like PPO's; verl's ``mean |logp - old_logp|`` is ``ppo_kl_abs``.
- ``seq-mean-token-sum-norm`` divides by (number of sequences x ``seq_norm_length``) (Dr.GRPO); this
  verl version divides the token sum by the max length only, which scales with the batch size.
- Padding positions are zeroed with ``torch.where`` so inf/NaN garbage there cannot leak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from schemas.config import PolicyLossConfig

Tensor = torch.Tensor
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class TokenSelector:
    """How a loss picks its special tokens over a whole mini-batch (global selection).

    ``select(log_prob, old_log_prob, advantages, mask, config, *, generator, rank_log_prob)`` returns a
    bool mask like ``mask``. ``log_prob`` is the current policy's; ``rank_log_prob`` (defaults to
    ``log_prob``) is what the covariance ranks by. ``needs_current_ratio``: the selection also depends on
    the current/old ratio (Clip-Cov skips tokens the PPO clip already zeroes), so the caller must supply
    the current policy's log-probs even when it ranks by others.
    """

    select: Callable[..., Tensor]
    needs_current_ratio: bool = False


_REGISTRY: dict[str, PolicyLossFn] = {}
_SELECTORS: dict[str, TokenSelector] = {}


def register_policy_loss(
    name: str, *, selector: TokenSelector | None = None
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a policy loss with the module's signature under ``name``.

    A loss that selects tokens (it reads ``selected=``) declares its ``selector``; the learner then runs
    it once over each optimizer mini-batch, across micro-batches and ranks, and hands every micro-batch
    its slice (split-invariant, see the module docstring).
    """

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"policy loss {name!r} is already registered; pick another name")
        _REGISTRY[name] = fn
        if selector is not None:
            _SELECTORS[name] = selector
        return fn

    return deco


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered under ``name`` (ValueError listing the known names otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def get_token_selector(name: str) -> TokenSelector | None:
    """The global token selector of loss ``name`` (None for losses that select nothing)."""
    get_policy_loss(name)
    return _SELECTORS.get(name)


# ---------------------------------------------------------------------------------- aggregation


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (0 when the mask is empty)."""
    m = mask.bool()
    return torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1)


def loss_normalizer(response_mask: Tensor, mode: str) -> float:
    """The global ``normalizer`` for ``mode`` on a full mini-batch: valid tokens or sequences."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; choose from {AGG_MODES}")
    if mode == "token-mean":
        return float(response_mask.bool().sum())
    return float(response_mask.shape[0])


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    normalizer: float | Tensor | None = None,
    seq_norm_length: int | None = None,
    drop: Tensor | None = None,
    token_weights: Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss (N, T) to a scalar.

    - ``token-mean``: ``sum_valid l / n_tokens``.
    - ``seq-mean-token-sum``: ``sum_seq (sum_t l) / n_seqs``.
    - ``seq-mean-token-mean``: ``sum_seq (mean_t l) / n_seqs``.
    - ``seq-mean-token-sum-norm``: ``sum_seq (sum_t l) / (n_seqs * L)``, L = ``seq_norm_length``
      or T (Dr.GRPO; set L explicitly when micro-batches are padded to different T).

    ``n_tokens`` / ``n_seqs`` are this batch's counts unless ``normalizer`` gives the global count
    (valid tokens for token-mean, sequences otherwise), in which case the losses of any split of the
    batch into micro-batches or ranks sum to the full-batch loss.

    ``drop`` (bool, like ``mask``): tokens whose term is replaced by 0 but which still count in every
    denominator (Clip-Cov's detached tokens); folded into the one masking ``where``.

    ``token_weights`` (like ``mask``; detached here, 0 at masked positions): each kept token's term is
    multiplied by its weight (truncated IS correction); denominators are unchanged.
    """
    m = mask.bool()
    keep = m if drop is None else m & ~drop.bool()
    if token_weights is not None:
        loss_mat = loss_mat * torch.where(keep, token_weights.detach().to(loss_mat.dtype), 0.0)
    masked = torch.where(keep, loss_mat, 0.0)
    if isinstance(normalizer, int | float) and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0 (a global token or sequence count), got {normalizer}")
    if mode == "token-mean":
        denom = m.sum().clamp(min=1) if normalizer is None else normalizer
        return masked.sum() / denom
    n_seqs = loss_mat.shape[0] if normalizer is None else normalizer
    if mode == "seq-mean-token-sum":
        return masked.sum() / n_seqs
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / m.sum(-1).clamp(min=1)).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        length = seq_norm_length if seq_norm_length is not None else loss_mat.shape[-1]
        return masked.sum() / (n_seqs * length)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; choose from {AGG_MODES}")


# ----------------------------------------------------------------------------- token covariance


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def token_covariance(
    log_prob: Tensor,
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
    a, lp = _wide(advantages.detach()), _wide(log_prob.detach())
    a_mu = masked_mean(a, m) if adv_mean is None else adv_mean
    lp_mu = masked_mean(lp, m) if logp_mean is None else logp_mean
    cov = (a - a_mu) * (lp - lp_mu)
    return torch.where(m, cov, 0.0)


def select_clip_cov(
    cov: Tensor,
    candidate_mask: Tensor,
    n_valid: int,
    config: PolicyLossConfig,
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


def select_kl_cov(cov: Tensor, mask: Tensor, n_valid: int, config: PolicyLossConfig) -> Tensor:
    """KL-Cov selection: the top ``max(1, int(k * n_valid))`` valid tokens by ``cov`` (bool mask)."""
    m = mask.bool()
    k = min(max(1, int(config.kl_cov_ratio * n_valid)), int(m.sum()))
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
    if k > 0:
        scores = torch.where(m, cov, torch.full_like(cov, -torch.inf)).reshape(-1)
        selected[scores.topk(k).indices] = True
    return selected.reshape(cov.shape)


def clip_cov_candidates(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig,
) -> Tensor:
    """Valid tokens whose PPO term is not already clipped (where the gradient is not already 0)."""
    with torch.no_grad():
        _, clipped, clipped_lower = _clipped_surrogate(log_prob.detach() - old_log_prob, advantages, config)
    return _unclipped(response_mask.bool(), clipped, clipped_lower)


def _unclipped(mask: Tensor, clipped: Tensor, clipped_lower: Tensor | None) -> Tensor:
    cand = mask & ~clipped
    return cand if clipped_lower is None else cand & ~clipped_lower


def _select_clip_cov_tokens(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig,
    *,
    generator: torch.Generator | None = None,
    rank_log_prob: Tensor | None = None,
) -> Tensor:
    cov = token_covariance(log_prob if rank_log_prob is None else rank_log_prob, advantages, mask)
    cand = clip_cov_candidates(log_prob, old_log_prob, advantages, mask, config)
    return select_clip_cov(cov, cand, int(mask.sum()), config, generator)


def _select_kl_cov_tokens(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig,
    *,
    generator: torch.Generator | None = None,
    rank_log_prob: Tensor | None = None,
) -> Tensor:
    cov = token_covariance(log_prob if rank_log_prob is None else rank_log_prob, advantages, mask)
    return select_kl_cov(cov, mask, int(mask.sum()), config)


def select_tokens(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig,
    *,
    generator: torch.Generator | None = None,
    rank_log_prob: Tensor | None = None,
) -> Tensor | None:
    """Global selection of ``config.name``'s loss over a whole mini-batch (None for losses that select
    nothing). Slice the result per micro-batch and pass it as ``selected=``.

    ``log_prob`` is the current policy's (the paper's ranking, and what the PPO-clip exclusion needs);
    ``rank_log_prob`` ranks by other log-probs instead (``learner.selection_logprobs: step_start``).
    """
    selector = get_token_selector(config.name)
    if selector is None:
        return None
    return selector.select(
        log_prob,
        old_log_prob,
        advantages,
        response_mask.bool(),
        config,
        generator=generator,
        rank_log_prob=rank_log_prob,
    )


# ------------------------------------------------------------------------------------ the losses


def _clipped_surrogate(neg_kl: Tensor, advantages: Tensor, config: PolicyLossConfig):
    """PPO per-token loss with clip-higher and optional dual clip; also which tokens were clipped.

    Returns ``(pg_losses, clipped, clipped_lower)``: ``clipped`` where the clipped branch is taken
    (``pg_losses2 > pg_losses1``, verl's definition) and ``clipped_lower`` where dual clip bites
    (None without dual clip; the two can overlap). Both carry zero gradient.
    """
    ratio = torch.exp(neg_kl)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    pg_losses = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    clipped_lower = None
    if config.clip_ratio_c is not None:
        pg3 = -advantages * config.clip_ratio_c
        clipped_lower = (pg_losses > pg3) & (advantages < 0)
        pg_losses = torch.where(advantages < 0, torch.minimum(pg3, pg_losses), pg_losses)
    return pg_losses, clipped, clipped_lower


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


@torch.no_grad()
def _common_stats(
    neg_kl: Tensor, mask: Tensor, clipped: Tensor | None, clipped_lower: Tensor | None
) -> dict[str, Tensor]:
    n = mask.sum().clamp(min=1)
    zero = neg_kl.new_zeros((), dtype=torch.float32)
    return {
        "pg_clipfrac": zero if clipped is None else (clipped & mask).sum() / n,
        "pg_clipfrac_lower": zero if clipped_lower is None else (clipped_lower & mask).sum() / n,
        "ppo_kl": -torch.where(mask, neg_kl, 0.0).sum() / n,
    }


@register_policy_loss("ppo")
def ppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig,
    *,
    normalizer: float | Tensor | None = None,
    selected: Tensor | None = None,
    generator: torch.Generator | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate (Schulman et al. 2017) with clip-higher and optional dual clip.

    Per token: ``max(-A r, -A clip(r, 1-eps_low, 1+eps_high))``, then for A < 0 with dual clip
    ``min(that, -A c)``; ``r = exp(clamp(logp - old_logp, -20, 20))`` as in verl. ``selected`` and
    ``generator`` are accepted for the common signature and ignored.
    """
    mask = response_mask.bool()
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    pg_losses, clipped, clipped_lower = _clipped_surrogate(neg_kl, advantages, config)
    loss = aggregate_loss(
        pg_losses,
        mask,
        config.loss_agg_mode,
        normalizer=normalizer,
        seq_norm_length=config.seq_norm_length,
        token_weights=token_weights,
    )
    stats = _common_stats(neg_kl, mask, clipped, clipped_lower)
    stats |= covariance_stats(token_covariance(log_prob, advantages, mask), mask)
    return loss, stats


@register_policy_loss("clip_cov", selector=TokenSelector(_select_clip_cov_tokens, needs_current_ratio=True))
def clip_cov_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig,
    *,
    normalizer: float | Tensor | None = None,
    selected: Tensor | None = None,
    generator: torch.Generator | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov (Cui et al. 2025, "Clip-Cov"): the PPO term, with a few high-covariance tokens detached.

    Selected tokens (``selected``, or drawn here by :func:`select_clip_cov` from the valid,
    not-yet-clipped tokens with ``lb < cov < ub``) contribute 0 to the loss and get exactly zero
    gradient; they still count in the token-mean denominator.
    """
    mask = response_mask.bool()
    neg_kl = log_prob - old_log_prob
    pg_losses, clipped, clipped_lower = _clipped_surrogate(neg_kl, advantages, config)
    cov = token_covariance(log_prob, advantages, mask)
    if selected is None:
        cand = _unclipped(mask, clipped.detach(), clipped_lower)
        selected = select_clip_cov(cov, cand, int(mask.sum()), config, generator)  # subset of mask
    else:
        selected = selected.bool() & mask
    loss = aggregate_loss(
        pg_losses,
        mask,
        config.loss_agg_mode,
        normalizer=normalizer,
        seq_norm_length=config.seq_norm_length,
        drop=selected,
        token_weights=token_weights,
    )
    stats = _common_stats(neg_kl, mask, clipped, clipped_lower)
    stats |= covariance_stats(cov, mask, selected)
    return loss, stats


@register_policy_loss("kl_cov", selector=TokenSelector(_select_kl_cov_tokens))
def kl_cov_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig,
    *,
    normalizer: float | Tensor | None = None,
    selected: Tensor | None = None,
    generator: torch.Generator | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov (Cui et al. 2025, "KL-Cov"): unclipped ``-A r`` on every valid token, plus
    ``beta * |logp - old_logp|`` on the top-k tokens by covariance (``selected`` or chosen here).

    It is a no-op on-policy (logp == old_logp); ``kl_cov/abs_kl_selected`` (mean |logp - old_logp|
    over the penalised tokens) lets the caller warn when it stays 0. ``generator`` is unused.
    """
    mask = response_mask.bool()
    neg_kl = log_prob - old_log_prob
    abs_kl = neg_kl.abs()
    pg_losses = -advantages * torch.exp(neg_kl)
    cov = token_covariance(log_prob, advantages, mask)
    if selected is None:
        selected = select_kl_cov(cov, mask, int(mask.sum()), config)
    selected = selected.bool() & mask
    pg_losses = pg_losses + torch.where(selected, config.kl_cov_beta * abs_kl, 0.0)
    loss = aggregate_loss(
        pg_losses,
        mask,
        config.loss_agg_mode,
        normalizer=normalizer,
        seq_norm_length=config.seq_norm_length,
        token_weights=token_weights,
    )
    stats = _common_stats(neg_kl, mask, None, None)
    stats["ppo_kl_abs"] = masked_mean(abs_kl.detach(), mask)
    stats["kl_cov/abs_kl_selected"] = masked_mean(abs_kl.detach(), selected)
    stats |= covariance_stats(cov, mask, selected)
    return loss, stats


# ------------------------------------------------------------------------------------ extra terms


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    coef: float,
    *,
    mode: str = "token-mean",
    normalizer: float | Tensor | None = None,
    seq_norm_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss term ``-coef * agg(entropy)`` (add it to the policy loss to reward entropy).

    Returns ``(term, {"entropy/mean": token-mean entropy of this batch})``; the stat is useful even
    with ``coef = 0`` (the paper's runs use no bonus but track entropy).
    """
    agg = aggregate_loss(entropy, mask, mode, normalizer=normalizer, seq_norm_length=seq_norm_length)
    return -coef * agg, {"entropy/mean": masked_mean(entropy.detach(), mask)}


def kl_penalty(log_prob: Tensor, ref_log_prob: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs (Schulman's k1/k2/k3).

    ``k1 = logp - ref``; ``k2 = (logp - ref)^2 / 2``; ``k3 = exp(ref - logp) - (ref - logp) - 1``
    (low variance, always >= 0), with ``ref - logp`` clamped to +-20 and the result to +-10 as in verl.
    """
    if kind == "k1":
        return log_prob - ref_log_prob
    if kind == "k2":
        return 0.5 * (log_prob - ref_log_prob).square()
    if kind == "k3":
        kl = torch.clamp(ref_log_prob - log_prob, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; choose 'k1', 'k2' or 'k3'")
