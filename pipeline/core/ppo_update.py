"""One RL step of learning on a TrainBatch: old log-probs, PPO epochs x mini-batches, entropy probe.

Engine-agnostic (no DeepSpeed import): the learner actor passes an object with ``module``,
``backward(loss)`` and ``step() -> grad_norm`` (a DeepSpeed engine wrapper), and ``all_gather`` for
its data-parallel group. Tests drive it with a plain torch optimizer and compare 1 vs 2 "ranks".

How a step splits the batch (same on every rank, seeded by step and epoch):
    rows --permute--> mini-batches (learner.mini_batches) --contiguous shard--> ranks --> micro-batches
Each micro-batch loss is normalised by the *global* token/sequence count of its mini-batch, and
backward is scaled by the world size (DeepSpeed averages gradients across ranks), so the update is
the same however the mini-batch is cut into micro-batches and ranks.

Token selection of Clip-Cov / KL-Cov (losses that declare a ``TokenSelector``) with
``learner.selection_scope: mini_batch`` -- covrl's fix of the reference's per-micro-batch selection --
runs once per mini-batch over every rank's tokens: the ranks all-gather (current logp, old logp,
advantage) per token, every rank runs the same seeded selection and keeps its slice. As in the paper's
code, tokens are ranked by the *current* policy's log-probs (``selection_logprobs: current``, the
default), which also tell Clip-Cov which tokens the PPO clip already zeroes. Where those come from:

- fused (every rank's share of the mini-batch fits one micro-batch, as in the default job): the detached
  output of the forward that computes the loss; selection sits between that forward and its backward,
  so it costs no extra pass;
- otherwise: one lean no-grad pass (log-probs only) over the rank's rows before the micro-batches, skipped
  for the first update of a step, where the current policy is the step-start one already computed.

``selection_logprobs: step_start`` (an opt-in approximation, docs/architecture.md) ranks by the
step-start log-probs instead; Clip-Cov still excludes clipped tokens by the current ratio, so it still
needs the current log-probs (the lean pass when not fused); KL-Cov then needs no pass at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.core.aggregation import aggregate_loss
from pipeline.core.covariance import covariance_stats, token_covariance
from pipeline.core.entropy_dynamics import predicted_entropy_change
from pipeline.core.entropy_probe import sgd_entropy_probe
from pipeline.core.losses import (
    PolicyLossFn,
    TokenSelector,
    entropy_bonus,
    get_policy_loss,
    get_token_selector,
    kl_penalty,
)
from pipeline.core.model_forward import (
    MicroBatch,
    batch_logprobs,
    make_micro_batch,
    micro_batches,
    response_logprobs,
    to_padded,
)
from pipeline.core.recipe import truncated_is_weights
from schemas.batches import TrainBatch, ragged_positions
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


def flat_positions(batch: TrainBatch, rows: np.ndarray) -> np.ndarray:
    """Positions of ``rows``' response tokens in the batch's flat per-token arrays, row by row."""
    return ragged_positions(batch.response_offsets, rows)


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


@dataclass
class StepState:
    """What every mini-batch update of one RL step shares. Flat arrays follow the batch's response-token
    layout (row by row, ``flat_positions``)."""

    batch: TrainBatch
    algo: AlgorithmConfig
    learner: LearnerConfig
    loss_fn: PolicyLossFn
    selector: TokenSelector | None  # None: the loss selects nothing, or selection is per micro-batch
    temperature: float
    full_logits: bool
    old: np.ndarray  # PPO's "old" log-probs
    step_start: np.ndarray  # the learner's log-probs of the policy that starts the step
    advantages: np.ndarray
    valid: np.ndarray  # bool: tokens that carry loss (rows with loss_mask 0 carry none)
    is_weights: np.ndarray | None  # truncated IS weights, when the correction is on
    generator: torch.Generator
    rank: int = 0
    world_size: int = 1
    all_gather: AllGather = single_process_gather
    loss_sum: float = 0.0  # micro-batch losses are parts of their mini-batch's loss: summed
    nonfinite: int = 0
    acc: _Accumulator = field(default_factory=_Accumulator)

    def micro_batches(self, rows: np.ndarray) -> list[np.ndarray]:
        cfg = self.learner
        return micro_batches(
            rows,
            cfg.micro_batch_size,
            lengths=self.batch.sequences.lengths,
            token_budget=cfg.micro_batch_tokens,
        )


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
    entropy_probe_lrs: Sequence[float] = (),
) -> UpdateResult:
    """Runs the update in place on ``trainable``; returns step metrics (identical on every rank) and,
    when ``inspect_top_k`` > 0, the batch's top tokens by covariance (before the update).
    ``entropy_probe_lrs``: rank 0 first probes one SGD step per lr from the step-start weights
    (``pipeline.core.entropy_probe``; the weights are restored before the update)."""
    model, loss_cfg = trainable.module, algo.policy_loss
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
    own = flat_positions(batch, static_rows)
    start_flat, ent_flat = _gather_full(all_gather, batch, own, old_local[own], ent_local[own])
    metrics = _step_start_metrics(batch, start_flat, ent_flat, adv_flat)
    if entropy_probe_lrs and rank == 0:
        metrics |= sgd_entropy_probe(
            model,
            batch,
            lrs=entropy_probe_lrs,
            temperature=temperature,
            micro_batch_size=learner.micro_batch_size,
            full_logits=full_logits,
        )
    top_tokens = _top_covariance_tokens(batch, start_flat, adv_flat, inspect_top_k) if inspect_top_k else []
    # Samples with loss_mask 0 (e.g. overlong) carry no loss, count in no denominator and are never selected.
    row_kept = np.ones(n, bool) if batch.loss_mask is None else batch.loss_mask > 0
    valid_flat = np.repeat(row_kept, r_len)
    # Truncated IS correction of the sampler/learner mismatch (weights logged even when not applied).
    is_weights, is_stats = truncated_is_weights(
        start_flat, batch.sampler_logprobs, algo.is_correction.cap, valid_flat
    )
    metrics |= is_stats
    # PPO's "old" policy: the learner's recomputation (sync mode), or the sampler's own log-probs when the
    # batch was generated with weights a version behind (one-step-async): ratios then correct the lag.
    old_flat = start_flat
    if old_logprobs_from_sampler:
        old_flat = np.asarray(batch.sampler_logprobs, dtype=np.float32)
    state = StepState(
        batch=batch,
        algo=algo,
        learner=learner,
        loss_fn=get_policy_loss(loss_cfg.name),
        selector=get_token_selector(loss_cfg.name) if learner.selection_scope == "mini_batch" else None,
        temperature=temperature,
        full_logits=full_logits,
        old=old_flat,
        step_start=start_flat,
        advantages=adv_flat,
        valid=valid_flat,
        is_weights=is_weights if algo.is_correction.enabled else None,
        generator=torch.Generator().manual_seed(seed),
        rank=rank,
        world_size=world_size,
        all_gather=all_gather,
    )

    rng = np.random.default_rng(seed)
    updates, skipped, grad_norms = 0, 0, []
    model.train()
    for epoch in range(learner.epochs):
        perm = rng.permutation(n)
        for mini_idx, mini in enumerate(np.array_split(perm, learner.mini_batches)):
            update_mini_batch(trainable, state, mini, first=epoch == 0 and mini_idx == 0)
            grad_norm = trainable.step()
            updates += 1
            if grad_norm is not None and not np.isfinite(grad_norm):
                skipped += 1
            elif grad_norm is not None:
                grad_norms.append(float(grad_norm))
    metrics |= state.acc.global_means(all_gather, "actor/")
    # mean over updates of the mini-batch loss (every rank's parts summed), independent of the split
    metrics["actor/loss"] = float(sum(all_gather(state.loss_sum))) / max(updates, 1)
    metrics["actor/updates"] = float(updates)
    metrics["actor/skipped_updates"] = float(skipped)
    metrics["actor/nonfinite_micro_batches"] = float(sum(all_gather(state.nonfinite)))
    if grad_norms:
        metrics["actor/grad_norm"] = float(np.mean(grad_norms))
    if measure_entropy_change:
        model.eval()
        _, ent_after_local = batch_logprobs(model, batch, static_rows, with_entropy=True, **fwd)
        (ent_after,) = _gather_full(all_gather, batch, own, ent_after_local[own])
        metrics["entropy/after_update"] = float(ent_after.mean())
        metrics["entropy/measured_change"] = metrics["entropy/after_update"] - metrics["entropy/mean"]
    return UpdateResult(metrics, top_tokens)


def update_mini_batch(trainable: Trainable, state: StepState, mini: np.ndarray, *, first: bool) -> None:
    """Forward/backward of this rank's share of one optimizer mini-batch (rows ``mini``, all ranks'),
    gradients accumulated in ``trainable``; the caller steps the optimizer. ``first``: no update has been
    applied yet this step (the current policy is the step-start one)."""
    model, batch = trainable.module, state.batch
    my_rows = shard(mini, state.rank, state.world_size)
    parts = state.micro_batches(my_rows)
    kept = mini if batch.loss_mask is None else mini[batch.loss_mask[mini] > 0]
    mode = state.algo.policy_loss.loss_agg_mode
    norm = float(batch.response_lengths[kept].sum()) if mode == "token-mean" else float(len(kept))
    norm = max(norm, 1.0)  # a fully masked mini-batch: every term is 0
    if state.selector is None:
        for part in parts:
            mb = make_micro_batch(batch, part)
            _backward(trainable, state, mb, *_forward(model, state, mb), None, norm)
        return
    fused = all(
        len(state.micro_batches(shard(mini, r, state.world_size))) <= 1 for r in range(state.world_size)
    )
    if not fused:
        selected = _select(state, _current_logprobs(model, state, my_rows, first=first))
        model.train()
        for part in parts:
            mb = make_micro_batch(batch, part)
            _backward(trainable, state, mb, *_forward(model, state, mb), selected, norm)
        return
    # Fused: select between the forward and its backward, from the forward's own detached log-probs.
    mb = make_micro_batch(batch, parts[0]) if parts else None
    if mb is None:  # this rank has no rows in this mini-batch; it still joins the gather
        _select(state, (np.zeros(0, np.int64), np.zeros(0, np.float32)))
        return
    logp, ent = _forward(model, state, mb)
    selected = _select(state, (mb.flat_index, logp.detach()[mb.response_mask].numpy()))
    _backward(trainable, state, mb, logp, ent, selected, norm)


def _current_logprobs(
    model, state: StepState, rows: np.ndarray, *, first: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(flat positions of ``rows``, the current policy's log-probs there) for selection outside the loss
    forward: the step-start log-probs where they are the current ones (first update) or where nothing
    needs the current ones (step_start ranking without a ratio-dependent selector); else a lean pass."""
    mine = flat_positions(state.batch, rows)
    ranks_by_start = state.learner.selection_logprobs == "step_start"
    if first or (ranks_by_start and not state.selector.needs_current_ratio):
        return mine, state.step_start[mine]
    model.eval()
    cfg = state.learner
    cur, _ = batch_logprobs(
        model,
        state.batch,
        rows,
        micro_batch_size=cfg.micro_batch_size,
        temperature=state.temperature,
        with_entropy=False,
        full_logits=state.full_logits,
        token_budget=cfg.micro_batch_tokens,
    )
    return mine, cur[mine]


def _select(state: StepState, current: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The selector's bool mask over the whole batch layout, from every rank's (positions, current
    log-probs) of this mini-batch; the same on every rank."""
    mine, cur_mine = current
    pos, cur, old, adv = (
        torch.from_numpy(x)
        for x in _concat_gathered(
            state.all_gather,
            mine.astype(np.float64),
            cur_mine.astype(np.float64),
            state.old[mine].astype(np.float64),
            state.advantages[mine].astype(np.float64),
        )
    )
    pos = pos.long().numpy()
    rank_by = None
    if state.learner.selection_logprobs == "step_start":
        rank_by = torch.from_numpy(state.step_start[pos]).float()
    sel = state.selector.select(
        cur.float(),
        old.float(),
        adv.float(),
        torch.from_numpy(state.valid[pos]),
        state.algo.policy_loss,
        generator=state.generator,
        rank_logprobs=rank_by,
    )
    selected = np.zeros(state.old.shape[0], dtype=bool)
    selected[pos[sel.numpy()]] = True
    return selected


def _forward(model, state: StepState, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    return response_logprobs(
        model,
        mb,
        temperature=state.temperature,
        with_entropy=state.algo.entropy_coef > 0,
        full_logits=state.full_logits,
    )


def _backward(
    trainable: Trainable,
    state: StepState,
    mb: MicroBatch,
    logp: torch.Tensor,
    ent: torch.Tensor | None,
    selected: np.ndarray | None,
    norm: float,
) -> None:
    """The micro-batch's loss (a part of its mini-batch's, global normaliser ``norm``), backward, stats."""
    batch, algo = state.batch, state.algo
    loss_cfg = algo.policy_loss
    mask = mb.response_mask
    old = to_padded(state.old, mb)
    adv = torch.from_numpy(batch.advantages[mb.rows])[:, None].expand_as(old) * mask
    if batch.loss_mask is not None:
        mask = mask & (torch.from_numpy(batch.loss_mask[mb.rows])[:, None] > 0)
    sel = None if selected is None else to_padded(selected.astype(np.float32), mb).bool()
    # Only passed when set, so policy losses registered without ``token_weights`` keep working.
    extra = {} if state.is_weights is None else {"token_weights": to_padded(state.is_weights, mb)}
    loss, stats = state.loss_fn(
        logp, old, adv, mask, loss_cfg, normalizer=norm, selected=sel, generator=state.generator, **extra
    )
    agg = dict(mode=loss_cfg.loss_agg_mode, normalizer=norm, seq_norm_length=loss_cfg.seq_norm_length)
    if ent is not None:
        term, _ = entropy_bonus(ent, mask, algo.entropy_coef, **agg)
        loss = loss + term
    if algo.kl_coef > 0 and batch.ref_logprobs is not None:
        kl = kl_penalty(logp, to_padded(batch.ref_logprobs, mb), algo.kl_estimator)
        loss = loss + algo.kl_coef * aggregate_loss(kl, mask, **agg)
        stats["kl_ref"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    stats = {k: v for k, v in stats.items() if not k.startswith("cov/") or k == "cov/selected_frac"}
    # A non-finite loss is still back-propagated: its NaN/inf reaches the gradient norm, which DeepSpeed
    # (ZeRO >= 1) checks before stepping -- the whole update is then skipped and the accumulated
    # gradients cleared, on every rank alike.
    if torch.isfinite(loss):
        state.acc.add(stats, float(mask.sum()))
        state.loss_sum += float(loss.detach())
    else:
        state.nonfinite += 1
    trainable.backward(loss * state.world_size)


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
    offsets = batch.response_offsets
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


def _gather_full(gather: AllGather, batch: TrainBatch, own: np.ndarray, *values: np.ndarray):
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
