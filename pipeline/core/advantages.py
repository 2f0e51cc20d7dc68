"""Outcome-advantage estimators: one scalar score per response -> one scalar advantage.

Shapes: ``scores`` is either (N,) with ``prompt_index`` (N,) naming each response's prompt, or (B, G)
(B prompts x G samples, rows are groups). The result has the shape of ``scores``. Per-token
advantages come from :func:`broadcast_to_tokens`.

Estimators (look up with :func:`get_advantage`, add your own with :func:`register_advantage`):

- ``grpo``: ``(s - mean_g) / (std_g + eps)`` with the unbiased (Bessel) group std, as in verl's
  ``compute_grpo_outcome_advantage``; ``norm_by_std=False`` gives Dr.GRPO's ``s - mean_g``.
- ``rloo``: leave-one-out baseline ``s_i - mean_{j != i} s_j = n/(n-1) * (s_i - mean_g)``.
- ``reinforce_pp``: REINFORCE++ (outcome reward, gamma = 1): whiten over the whole batch,
  ``(s - mean) * rsqrt(var_unbiased + 1e-8)``; pass ``lengths`` to weight each response by its
  token count, which reproduces verl's token-level ``masked_whiten``.

Deviations from verl: a group of size 1 gets advantage 0 (verl passes the raw score through
for ``grpo`` (mean 0, std 1) and ``rloo``): a lone sample carries no baseline, and a raw score of 1
would be a large unbaselined push. Groups of equal scores give exactly 0 (never NaN). The
computation is vectorised (``index_add``) instead of a Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from schemas.run_config import AdvantageConfig

AdvantageFn = Callable[..., torch.Tensor]
_REGISTRY: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register ``fn(scores, prompt_index=None, **kwargs) -> advantages`` under ``name``."""

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered; pick another name")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered under ``name`` (ValueError listing the known names otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def compute_advantages(name: str, scores: torch.Tensor, prompt_index=None, **kwargs) -> torch.Tensor:
    """Shortcut: ``get_advantage(name)(scores, prompt_index, **kwargs)``."""
    return get_advantage(name)(scores, prompt_index, **kwargs)


def advantages_from_config(cfg: AdvantageConfig, scores: torch.Tensor, prompt_index=None) -> torch.Tensor:
    """The configured estimator (``algorithm.advantage``) with its settings: what a run trains on."""
    kwargs = {"norm_by_std": cfg.norm_by_std, "eps": cfg.eps} if cfg.name == "grpo" else {}
    return compute_advantages(cfg.name, scores, prompt_index, **kwargs)


def _flatten_groups(scores: torch.Tensor, prompt_index) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(N,) float scores, (N,) dense int64 group index in [0, n_groups), n_groups."""
    scores = torch.as_tensor(scores)
    if not scores.is_floating_point():
        scores = scores.float()
    if scores.dim() == 2 and prompt_index is None:
        b, g = scores.shape
        inverse = torch.arange(b, device=scores.device).repeat_interleave(g)
        return scores.reshape(-1), inverse, b
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,) with prompt_index or (B, G); got shape {tuple(scores.shape)}")
    if prompt_index is None:
        raise ValueError("scores of shape (N,) need prompt_index (N,) naming each response's prompt")
    ids = prompt_index.cpu().numpy() if isinstance(prompt_index, torch.Tensor) else np.asarray(prompt_index)
    if ids.shape != (scores.shape[0],):
        raise ValueError(f"prompt_index must have shape ({scores.shape[0]},), got {ids.shape}")
    _, inverse = np.unique(ids, return_inverse=True)
    inverse_t = torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=scores.device)
    return scores, inverse_t, int(inverse.max()) + 1 if len(inverse) else 0


def _group_moments(s: torch.Tensor, idx: torch.Tensor, n_groups: int):
    """Per-sample group size, mean and unbiased variance (variance 0 for size-1 groups)."""
    count = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, idx, torch.ones_like(s))
    total = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, idx, s)
    mean = (total / count.clamp(min=1))[idx]
    sq = torch.zeros(n_groups, dtype=s.dtype, device=s.device).index_add_(0, idx, (s - mean) ** 2)
    n = count[idx]
    var = sq[idx] / (n - 1).clamp(min=1)
    return n, mean, var


@register_advantage("grpo")
def grpo_advantage(
    scores: torch.Tensor, prompt_index=None, *, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: ``(s - mean_g) / (std_g + eps)``; Dr.GRPO when ``norm_by_std=False``. Shape of ``scores``."""
    shape = torch.as_tensor(scores).shape
    s, idx, n_groups = _flatten_groups(scores, prompt_index)
    n, mean, var = _group_moments(s, idx, n_groups)
    adv = s - mean
    if norm_by_std:
        adv = adv / (var.sqrt() + eps)
    return torch.where(n > 1, adv, torch.zeros_like(adv)).reshape(shape)


@register_advantage("rloo")
def rloo_advantage(scores: torch.Tensor, prompt_index=None) -> torch.Tensor:
    """RLOO: ``s_i - mean of the other samples in the group``. Shape of ``scores``."""
    shape = torch.as_tensor(scores).shape
    s, idx, n_groups = _flatten_groups(scores, prompt_index)
    n, mean, _ = _group_moments(s, idx, n_groups)
    adv = (s - mean) * n / (n - 1).clamp(min=1)
    return torch.where(n > 1, adv, torch.zeros_like(adv)).reshape(shape)


@register_advantage("reinforce_pp")
def reinforce_pp_advantage(
    scores: torch.Tensor, prompt_index=None, *, lengths: torch.Tensor | Sequence[int] | None = None
) -> torch.Tensor:
    """REINFORCE++: batch whitening ``(s - mean) * rsqrt(var + 1e-8)``; ``prompt_index`` is ignored.

    ``lengths`` (N,) weights each response by its token count (verl's token-level whitening);
    without it every response weighs the same. Shape of ``scores``.
    """
    s = torch.as_tensor(scores)
    shape = s.shape
    s = (s if s.is_floating_point() else s.float()).reshape(-1)
    w = torch.ones_like(s) if lengths is None else torch.as_tensor(lengths, dtype=s.dtype, device=s.device)
    w = w.reshape(-1)
    total = w.sum()
    if s.numel() < 2 or total <= 1:
        return torch.zeros(shape, dtype=s.dtype, device=s.device)
    mean = (w * s).sum() / total
    var = (w * (s - mean) ** 2).sum() / total * total / (total - 1)
    return ((s - mean) * torch.rsqrt(var + 1e-8)).reshape(shape)


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages (N, T): each response's scalar on its valid tokens, 0 on padding.

    Example: ``advantages = [0.5, -1]``, ``response_mask = [[1, 1, 0], [1, 0, 0]]`` ->
    ``[[0.5, 0.5, 0], [-1, 0, 0]]``.
    """
    adv = advantages.reshape(-1)
    if response_mask.dim() != 2 or response_mask.shape[0] != adv.shape[0]:
        raise ValueError(
            f"need advantages (N,) and response_mask (N, T); got {tuple(adv.shape)}, {tuple(response_mask.shape)}"
        )
    return adv.unsqueeze(-1) * response_mask.to(adv.dtype)
