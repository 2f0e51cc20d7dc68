"""One RL step of learning on a TrainBatch: old log-probs, PPO epochs x mini-batches, entropy probe.

Engine-agnostic (no DeepSpeed import): the learner actor passes an object with ``module``,
``backward(loss)`` and ``step() -> grad_norm`` (a DeepSpeed engine wrapper), and ``all_gather`` for
its data-parallel group. Tests drive it with a plain torch optimizer and compare 1 vs 2 "ranks".

How a step splits the batch (same on every rank, seeded by step and epoch):
    rows --permute--> mini-batches (learner.mini_batches) --contiguous shard--> ranks --> micro-batches
Each micro-batch loss is normalised by the *global* token/sequence count of its mini-batch, and
backward is scaled by the world size (DeepSpeed averages gradients across ranks), so the update is
the same however the mini-batch is cut into micro-batches and ranks.

Clip-Cov / KL-Cov selection with ``selection_scope='mini_batch'`` (covrl's fix of the reference's
per-micro-batch selection): a no-grad pass computes the current log-probs of the rank's rows, the
ranks all-gather (logp, old logp, advantage) per token, every rank runs the same seeded selection on
the whole mini-batch and keeps its slice. For the first update of a step the current policy equals
the old one, so the pass is skipped and the old log-probs are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.entropy_dynamics import predicted_entropy_change
from pipeline.losses import (
    aggregate_loss,
    covariance_stats,
    entropy_bonus,
    get_policy_loss,
    kl_penalty,
    select_tokens,
    token_covariance,
)
from pipeline.model_forward import (
    batch_logprobs,
    make_micro_batch,
    micro_batches,
    response_logprobs,
    to_padded,
)
from pipeline.recipe import truncated_is_weights
from schemas.batches import TrainBatch
from schemas.run_config import AlgorithmConfig, LearnerConfig

AllGather = Callable[[Any], list[Any]]  # every rank's object, in rank order (all_gather_object)


class Trainable(Protocol):
    module: torch.nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float | None: ...


def single_process_gather(x: Any) -> list[Any]:
    return [x]


def shard(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    return np.array_split(rows, world_size)[rank]


def _concat_gathered(gather: AllGather, *arrays: np.ndarray) -> list[np.ndarray]:
    """All-gather several same-length flat arrays in one call; concatenated in rank order."""
    parts = gather(np.stack(arrays) if arrays[0].size else np.zeros((len(arrays), 0), np.float32))
    return list(np.concatenate(parts, axis=1))


class _Accumulator:
    """Token-weighted means of per-micro-batch stats."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, stats: dict[str, torch.Tensor | float], weight: float) -> None:
        self.weight += weight
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight

    def global_means(self, gather: AllGather, prefix: str = "") -> dict[str, float]:
        """Means over every rank's micro-batches (so every rank reports the same numbers)."""
        parts = gather((self.sums, self.weight))
        weight = sum(w for _, w in parts)
        sums: dict[str, float] = {}
        for part, _ in parts:
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
        return {prefix + k: v / max(weight, 1e-12) for k, v in sums.items()}


def ppo_update(
    trainable: Trainable,
    batch: TrainBatch,
    *,
    algo: AlgorithmConfig,
    learner: LearnerConfig,
    temperature: float,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    all_gather: AllGather = single_process_gather,
    measure_entropy_change: bool = False,
    inspect_top_k: int = 0,
    old_logprobs_from_sampler: bool = False,
    full_logits: bool = False,
) -> UpdateResult:
    """Runs the update in place on ``trainable``; returns step metrics (identical on every rank) and,
    when ``inspect_top_k`` > 0, the batch's top tokens by covariance (before the update)."""
    model, loss_cfg = trainable.module, algo.policy_loss
    loss_fn = get_policy_loss(loss_cfg.name)
    n = len(batch)
    r_len = batch.response_lengths
    adv_flat = np.repeat(batch.advantages, r_len).astype(np.float32)
    fwd = dict(
        micro_batch_size=learner.micro_batch_size,
        temperature=temperature,
        full_logits=full_logits,
        token_budget=learner.micro_batch_tokens,
    )

    # Old log-probs (and entropy before the update) of the policy that starts this step, gathered.
    static_rows = shard(np.arange(n), rank, world_size)
    model.eval()
    old_local, ent_local = batch_logprobs(model, batch, static_rows, with_entropy=True, **fwd)
    own = _flat_positions(batch, static_rows)
    old_flat, ent_flat = _gather_full(all_gather, batch, static_rows, own, old_local[own], ent_local[own])
    metrics = _step_start_metrics(batch, old_flat, ent_flat, adv_flat)
    top_tokens = _top_covariance_tokens(batch, old_flat, adv_flat, inspect_top_k) if inspect_top_k else []
    # Samples with loss_mask 0 (e.g. overlong) carry no loss, count in no denominator and are never selected.
    row_kept = np.ones(n, bool) if batch.loss_mask is None else batch.loss_mask > 0
    valid_flat = np.repeat(row_kept, r_len)
    # Truncated IS correction of the sampler/learner mismatch (weights logged even when not applied).
    cap = algo.is_correction.cap
    is_weights, is_stats = truncated_is_weights(old_flat, batch.sampler_logprobs, cap, valid_flat)
    metrics |= is_stats
    is_flat = is_weights if algo.is_correction.enabled else None
    # PPO's "old" policy: the learner's recomputation (sync mode), or the sampler's own log-probs when the
    # batch was generated with weights a version behind (one-step-async): ratios then correct the lag.
    start_flat = old_flat
    if old_logprobs_from_sampler:
        old_flat = np.asarray(batch.sampler_logprobs, dtype=np.float32)

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    acc, updates, bad, skipped = _Accumulator(), 0, 0, 0
    loss_sum = 0.0  # micro-batch losses are parts of their mini-batch's loss (global normaliser): summed
    grad_norms: list[float] = []
    model.train()
    for epoch in range(learner.epochs):
        perm = rng.permutation(n)
        for mini_idx, mini in enumerate(np.array_split(perm, learner.mini_batches)):
            my_rows = shard(mini, rank, world_size)
            first = epoch == 0 and mini_idx == 0
            selected_flat = None
            if loss_cfg.name in ("clip_cov", "kl_cov") and learner.selection_scope == "mini_batch":
                selected_flat = _global_selection(
                    model,
                    batch,
                    mini,
                    my_rows,
                    start_flat,
                    old_flat,
                    adv_flat,
                    loss_cfg,
                    gen,
                    all_gather,
                    first,
                    fwd,
                    valid_flat,
                    learner,
                )
                model.train()
            kept = mini[row_kept[mini]]
            norm = float(r_len[kept].sum()) if loss_cfg.loss_agg_mode == "token-mean" else float(len(kept))
            norm = max(norm, 1.0)  # a fully masked mini-batch: every term is 0
            parts = micro_batches(
                my_rows,
                learner.micro_batch_size,
                lengths=batch.sequences.lengths,
                token_budget=learner.micro_batch_tokens,
            )
            for part in parts:
                loss, stats, tokens = _micro_batch_loss(
                    model,
                    batch,
                    part,
                    old_flat,
                    selected_flat,
                    norm,
                    algo,
                    loss_fn,
                    temperature,
                    gen,
                    full_logits,
                    is_flat,
                )
                # A non-finite loss is still back-propagated: its NaN/inf reaches the gradient norm, which
                # DeepSpeed (ZeRO >= 1) checks before stepping — the whole update is then skipped and the
                # accumulated gradients cleared, on every rank alike.
                if torch.isfinite(loss):
                    acc.add(stats, tokens)
                    loss_sum += float(loss.detach())
                else:
                    bad += 1
                trainable.backward(loss * world_size)
            grad_norm = trainable.step()
            updates += 1
            if grad_norm is not None and not np.isfinite(grad_norm):
                skipped += 1
            elif grad_norm is not None:
                grad_norms.append(float(grad_norm))
    metrics |= acc.global_means(all_gather, "actor/")
    # mean over updates of the mini-batch loss (every rank's parts summed), independent of the split
    metrics["actor/loss"] = float(sum(all_gather(loss_sum))) / max(updates, 1)
    metrics["actor/updates"] = float(updates)
    metrics["actor/skipped_updates"] = float(skipped)
    metrics["actor/nonfinite_micro_batches"] = float(sum(all_gather(bad)))
    if grad_norms:
        metrics["actor/grad_norm"] = float(np.mean(grad_norms))
    if measure_entropy_change:
        model.eval()
        _, ent_after_local = batch_logprobs(model, batch, static_rows, with_entropy=True, **fwd)
        (ent_after,) = _gather_full(all_gather, batch, static_rows, own, ent_after_local[own])
        metrics["entropy/after_update"] = float(ent_after.mean())
        metrics["entropy/measured_change"] = metrics["entropy/after_update"] - metrics["entropy/mean"]
    return UpdateResult(metrics, top_tokens)


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    top_tokens: list[dict[str, float]] = field(default_factory=list)


def _top_covariance_tokens(
    batch: TrainBatch, old: np.ndarray, adv: np.ndarray, k: int
) -> list[dict[str, float]]:
    """The k tokens with the largest covariance term (A - mean A)(logp - mean logp): the ones that
    drive entropy down. ``row``/``t`` locate them (sample row, response position)."""
    cov = (adv - adv.mean()) * (old - old.mean())
    k = min(k, cov.shape[0])
    top = np.argpartition(-cov, k - 1)[:k] if k else np.zeros(0, np.int64)
    top = top[np.argsort(-cov[top])]
    offsets = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(batch.response_lengths, out=offsets[1:])
    rows = np.searchsorted(offsets, top, side="right") - 1
    return [
        {
            "row": int(r),
            "t": int(i - offsets[r]),
            "cov": float(cov[i]),
            "advantage": float(adv[i]),
            "logprob": float(old[i]),
            "prob": float(np.exp(old[i])),
        }
        for i, r in zip(top, rows)
    ]


def _flat_positions(batch: TrainBatch, rows: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(batch.response_lengths, out=offsets[1:])
    lengths = batch.response_lengths[rows]
    starts = np.repeat(offsets[:-1][rows], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts + within


def _gather_full(
    gather: AllGather, batch: TrainBatch, rows: np.ndarray, own: np.ndarray, *values: np.ndarray
):
    """Each rank holds ``values`` at flat positions ``own``; returns full flat arrays on every rank."""
    gathered = _concat_gathered(gather, own.astype(np.float64), *[v.astype(np.float64) for v in values])
    positions = gathered[0].astype(np.int64)
    out = []
    for g in gathered[1:]:
        full = np.zeros(int(batch.response_lengths.sum()), dtype=np.float32)
        full[positions] = g
        out.append(full)
    return out


def _step_start_metrics(
    batch: TrainBatch, old: np.ndarray, ent: np.ndarray, adv: np.ndarray
) -> dict[str, float]:
    """Entropy, covariance and sampler/learner mismatch of the batch before any update."""
    lp, a = torch.from_numpy(old), torch.from_numpy(adv)
    mask = torch.ones_like(lp, dtype=torch.bool)
    cov = token_covariance(lp, a, mask)
    diff = np.abs(old - batch.sampler_logprobs)
    out = {
        "entropy/mean": float(ent.mean()) if ent.size else 0.0,
        "entropy/p10": float(np.percentile(ent, 10)) if ent.size else 0.0,
        "entropy/p50": float(np.percentile(ent, 50)) if ent.size else 0.0,
        "entropy/p90": float(np.percentile(ent, 90)) if ent.size else 0.0,
        "entropy/predicted_change": float(predicted_entropy_change(lp, a, mask)),
        "mismatch/logprob_abs_mean": float(diff.mean()) if diff.size else 0.0,
        "mismatch/logprob_abs_max": float(diff.max()) if diff.size else 0.0,
        # KL(sampler || learner) estimated on sampled tokens (k3, always >= 0).
        "mismatch/kl": float(kl_penalty(torch.tensor(batch.sampler_logprobs), lp, "k3").mean())
        if diff.size
        else 0.0,
    }
    out |= {k: float(v) for k, v in covariance_stats(cov, mask).items() if k != "cov/selected_frac"}
    return out


def _global_selection(
    model,
    batch,
    mini,
    my_rows,
    start_flat,
    old_flat,
    adv_flat,
    loss_cfg,
    gen,
    all_gather,
    first,
    fwd,
    valid_flat,
    learner_cfg,
):
    """Selection over the whole mini-batch (all ranks); returns a flat bool mask over the batch layout."""
    mine = _flat_positions(batch, my_rows)
    if first or learner_cfg.selection_logprobs == "step_start":
        cur_mine = start_flat[mine]  # first update of the step: the current policy *is* the step-start one
    else:
        model.eval()
        cur, _ = batch_logprobs(model, batch, my_rows, with_entropy=False, **fwd)
        cur_mine = cur[mine]
    pos, cur, old, adv = (
        torch.from_numpy(x)
        for x in _concat_gathered(
            all_gather, mine.astype(np.float64), cur_mine, old_flat[mine], adv_flat[mine]
        )
    )
    valid = torch.from_numpy(valid_flat[pos.long().numpy()])
    sel = select_tokens(cur.float(), old.float(), adv.float(), valid, loss_cfg, generator=gen)
    selected = np.zeros(old_flat.shape[0], dtype=bool)
    selected[pos.long().numpy()[sel.numpy()]] = True
    return selected


def _micro_batch_loss(
    model,
    batch,
    part,
    old_flat,
    selected_flat,
    norm,
    algo,
    loss_fn,
    temperature,
    gen,
    full_logits,
    is_flat=None,
):
    loss_cfg = algo.policy_loss
    mb = make_micro_batch(batch, part)
    mask = mb.response_mask
    need_entropy = algo.entropy_coef > 0
    logp, ent = response_logprobs(
        model, mb, temperature=temperature, with_entropy=need_entropy, full_logits=full_logits
    )
    old = to_padded(old_flat, mb)
    adv = torch.from_numpy(batch.advantages[part])[:, None].expand_as(old) * mask
    if batch.loss_mask is not None:
        mask = mask & (torch.from_numpy(batch.loss_mask[part])[:, None] > 0)
    selected = None if selected_flat is None else to_padded(selected_flat.astype(np.float32), mb).bool()
    # Only passed when set, so policy losses registered without ``token_weights`` keep working.
    extra = {} if is_flat is None else {"token_weights": to_padded(is_flat, mb)}
    loss, stats = loss_fn(
        logp, old, adv, mask, loss_cfg, normalizer=norm, selected=selected, generator=gen, **extra
    )
    agg = dict(mode=loss_cfg.loss_agg_mode, normalizer=norm, seq_norm_length=loss_cfg.seq_norm_length)
    if need_entropy:
        term, _ = entropy_bonus(ent, mask, algo.entropy_coef, **agg)
        loss = loss + term
    if algo.kl_coef > 0 and batch.ref_logprobs is not None:
        kl = kl_penalty(logp, to_padded(batch.ref_logprobs, mb), algo.kl_estimator)
        kl_loss = aggregate_loss(kl, mask, **agg)
        loss = loss + algo.kl_coef * kl_loss
        stats["kl_ref"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    stats = {k: v for k, v in stats.items() if not k.startswith("cov/") or k == "cov/selected_frac"}
    return loss, stats, float(mask.sum())
