"""Policy losses (PPO, Clip-Cov, KL-Cov), their registry and token selectors, entropy bonus and KL penalty.

Every registered policy loss has one signature::

    fn(logprobs, old_logprobs, advantages, response_mask, config, *,
       normalizer=None, selected=None, generator=None, token_weights=None) -> (loss, stats)

with (N, T) per-token tensors (N responses padded to T tokens; advantages already broadcast to
tokens), ``config`` a :class:`schemas.config.PolicyLossConfig`, ``loss`` a scalar to minimise and
``stats`` a dict of detached 0-dim tensors with stable names.
``token_weights`` (optional, (N, T), treated as constants) multiply each token's policy loss before
aggregation -- the truncated importance-sampling correction for sampler/learner mismatch
(``pipeline.core.recipe.truncated_is_weights``). Callers pass it only when set, so losses registered
without the keyword keep working.

The per-token covariance and the selection rules live in ``pipeline.core.covariance``; aggregation and the
global normaliser in ``pipeline.core.aggregation``.

Global selection (deviation from the reference, which picks tokens per micro-batch on each GPU,
verl issue #7829): the learner runs :func:`select_tokens` once on the whole optimizer mini-batch
(all micro-batches; on several ranks, with global means via ``token_covariance(adv_mean=...,
logp_mean=...)`` and the global ``n_valid``) and passes each micro-batch its slice of the boolean
``selected`` mask plus the global ``normalizer`` (``pipeline.core.aggregation.loss_normalizer``). The sum of the
micro-batch losses -- and so the gradient -- is then the same however the batch is split. With
``selected=None`` a loss selects inside the batch it is given (reference behaviour).

Other deviations from verl (volcengine/verl ``core_algos.py``):
- ``clip_ratio_c=None`` disables dual clip (verl always applies it, default 3.0). When it is set,
  Clip-Cov applies it too, and dual-clipped tokens are not Clip-Cov candidates (verl's Clip-Cov has
  no dual clip). Identical to verl when ``clip_ratio_c`` is None.
- Clip-Cov's ``pg_clipfrac`` is the PPO clip fraction; the detached fraction is ``cov/selected_frac``
  (verl reports the detached fraction as ``pg_clipfrac``). KL-Cov's ``ppo_kl`` is the signed approx
  KL like PPO's; verl's ``mean |logp - old_logp|`` is ``ppo_kl_abs``.
- Aggregation deviations: ``pipeline.core.aggregation``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.core.aggregation import aggregate_loss, masked_mean
from pipeline.core.covariance import covariance_stats, select_clip_cov, select_kl_cov, token_covariance
from schemas.config import PolicyLossConfig

Tensor = torch.Tensor
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class TokenSelector:
    """How a loss picks its special tokens over a whole mini-batch (global selection).

    ``select(logprobs, old_logprobs, advantages, mask, config, *, generator, rank_logprobs)`` returns a
    bool mask like ``mask``. ``logprobs`` is the current policy's; ``rank_logprobs`` (defaults to
    ``logprobs``) is what the covariance ranks by. ``needs_current_ratio``: the selection also depends on
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
    """The policy loss registered under ``name``, or imported from ``name`` = ``package.module:function``
    (ValueError naming the known losses, or why the import failed, otherwise)."""
    if name not in _REGISTRY and ":" in name:
        _REGISTRY[name] = _import_loss(name)
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown policy loss {name!r}; registered: {sorted(_REGISTRY)} or 'package.module:function'"
        )
    return _REGISTRY[name]


def get_token_selector(name: str) -> TokenSelector | None:
    """The global token selector of loss ``name`` (None for losses that select nothing). A loss given by
    import path declares one as its ``token_selector`` attribute."""
    fn = get_policy_loss(name)
    return _SELECTORS.get(name) or getattr(fn, "token_selector", None)


def _import_loss(path: str) -> PolicyLossFn:
    module, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"policy loss {path!r} cannot be imported ({type(e).__name__}: {e}); make it importable where the "
            "learner runs (installed, on PYTHONPATH, or in the job's working dir)"
        ) from None
    if not callable(fn):
        raise ValueError(f"policy loss {path!r} is not a function")
    return fn


# ------------------------------------------------------------------------------- token selection


def clip_cov_candidates(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig,
) -> Tensor:
    """Valid tokens whose PPO term is not already clipped (where the gradient is not already 0)."""
    with torch.no_grad():
        _, clipped, clipped_lower = _clipped_surrogate(logprobs.detach() - old_logprobs, advantages, config)
    return _unclipped(response_mask.bool(), clipped, clipped_lower)


def _unclipped(mask: Tensor, clipped: Tensor, clipped_lower: Tensor | None) -> Tensor:
    cand = mask & ~clipped
    return cand if clipped_lower is None else cand & ~clipped_lower


def _select_clip_cov_tokens(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig,
    *,
    generator: torch.Generator | None = None,
    rank_logprobs: Tensor | None = None,
) -> Tensor:
    cov = token_covariance(logprobs if rank_logprobs is None else rank_logprobs, advantages, mask)
    cand = clip_cov_candidates(logprobs, old_logprobs, advantages, mask, config)
    return select_clip_cov(cov, cand, int(mask.sum()), config, generator)


def _select_kl_cov_tokens(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig,
    *,
    generator: torch.Generator | None = None,
    rank_logprobs: Tensor | None = None,
) -> Tensor:
    cov = token_covariance(logprobs if rank_logprobs is None else rank_logprobs, advantages, mask)
    return select_kl_cov(cov, mask, int(mask.sum()), config)


def select_tokens(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig,
    *,
    generator: torch.Generator | None = None,
    rank_logprobs: Tensor | None = None,
) -> Tensor | None:
    """Global selection of ``config.name``'s loss over a whole mini-batch (None for losses that select
    nothing). Slice the result per micro-batch and pass it as ``selected=``.

    ``logprobs`` is the current policy's (the paper's ranking, and what the PPO-clip exclusion needs);
    ``rank_logprobs`` ranks by other log-probs instead (``learner.selection_logprobs: step_start``).
    """
    selector = get_token_selector(config.name)
    if selector is None:
        return None
    return selector.select(
        logprobs,
        old_logprobs,
        advantages,
        response_mask.bool(),
        config,
        generator=generator,
        rank_logprobs=rank_logprobs,
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
    logprobs: Tensor,
    old_logprobs: Tensor,
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
    neg_kl = torch.clamp(logprobs - old_logprobs, min=-20.0, max=20.0)
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
    stats |= covariance_stats(token_covariance(logprobs, advantages, mask), mask)
    return loss, stats


@register_policy_loss("clip_cov", selector=TokenSelector(_select_clip_cov_tokens, needs_current_ratio=True))
def clip_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
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
    neg_kl = logprobs - old_logprobs
    pg_losses, clipped, clipped_lower = _clipped_surrogate(neg_kl, advantages, config)
    cov = token_covariance(logprobs, advantages, mask)
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
    logprobs: Tensor,
    old_logprobs: Tensor,
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
    neg_kl = logprobs - old_logprobs
    abs_kl = neg_kl.abs()
    pg_losses = -advantages * torch.exp(neg_kl)
    cov = token_covariance(logprobs, advantages, mask)
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


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs (Schulman's k1/k2/k3).

    ``k1 = logp - ref``; ``k2 = (logp - ref)^2 / 2``; ``k3 = exp(ref - logp) - (ref - logp) - 1``
    (low variance, always >= 0), with ``ref - logp`` clamped to +-20 and the result to +-10 as in verl.
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "k3":
        kl = torch.clamp(ref_logprobs - logprobs, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; choose 'k1', 'k2' or 'k3'")
