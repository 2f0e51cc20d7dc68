"""One optimizer mini-batch of the PPO update on one rank: forward, loss, backward, with the global token
selection of Clip-Cov / KL-Cov (``pipeline.core.ppo_update`` explains where the current log-probs come
from: the loss forward itself when fused, else one lean no-grad pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.core.aggregation import aggregate_loss
from pipeline.core.losses import PolicyLossFn, TokenSelector, entropy_bonus, kl_penalty
from pipeline.core.model_forward import (
    MicroBatch,
    batch_logprobs,
    make_micro_batch,
    micro_batches,
    response_logprobs,
    to_padded,
)
from pipeline.core.ranks import (
    Accumulator,
    AllGather,
    Trainable,
    concat_gathered,
    flat_positions,
    shard,
    single_process_gather,
)
from schemas.batches import TrainBatch
from schemas.run_config import AlgorithmConfig, LearnerConfig


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
    acc: Accumulator = field(default_factory=Accumulator)

    def micro_batches(self, rows: np.ndarray) -> list[np.ndarray]:
        cfg = self.learner
        return micro_batches(
            rows,
            cfg.micro_batch_size,
            lengths=self.batch.sequences.lengths,
            token_budget=cfg.micro_batch_tokens,
        )


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
    # Before the first update the current policy IS the old one: its ratio is exactly 1 and KL-Cov's
    # |logp - old| exactly 0. Taking "old" from the loss forward itself keeps it so; the separately computed
    # step-start log-probs differ from it by float noise (batch shape, kernels), whose sign would give
    # KL-Cov's penalty a random +-beta gradient on the first mini-batch of every step.
    on_policy = first and state.old is state.step_start
    if state.selector is None:
        for part in parts:
            mb = make_micro_batch(batch, part)
            _backward(trainable, state, mb, *_forward(model, state, mb), None, norm, on_policy)
        return
    if not parts:  # this rank has no rows in this mini-batch; it still joins the gather
        _select(state, (np.zeros(0, np.int64), np.zeros(0, np.float32)))
        return
    if _needs_no_pass(state, first):  # selection from the step-start log-probs
        mine = flat_positions(batch, my_rows)
        selected = _select(state, (mine, state.step_start[mine]))
        for part in parts:
            mb = make_micro_batch(batch, part)
            _backward(trainable, state, mb, *_forward(model, state, mb), selected, norm, on_policy)
        return
    # Selection needs the current policy's log-probs of the whole mini-batch before any backward. The first
    # micro-batch's loss forward supplies its own (its graph is kept until the selection is known); only the
    # other micro-batches need a lean no-grad pass. Fused (one micro-batch per rank): no extra pass at all.
    head = make_micro_batch(batch, parts[0])
    logp, ent = _forward(model, state, head)
    positions, current = [head.flat_index], [logp.detach()[head.response_mask].numpy()]
    if len(parts) > 1:
        rest = np.concatenate(parts[1:])
        positions.append(flat_positions(batch, rest))
        current.append(_lean_logprobs(model, state, rest)[positions[-1]])
    selected = _select(state, (np.concatenate(positions), np.concatenate(current)))
    _backward(trainable, state, head, logp, ent, selected, norm, on_policy)
    for part in parts[1:]:
        mb = make_micro_batch(batch, part)
        _backward(trainable, state, mb, *_forward(model, state, mb), selected, norm, on_policy)


def _needs_no_pass(state: StepState, first: bool) -> bool:
    """The step-start log-probs serve the selection: they are the current ones (first update), or nothing
    needs the current ones (step_start ranking without a ratio-dependent selector)."""
    ranks_by_start = state.learner.selection_logprobs == "step_start"
    return first or (ranks_by_start and not state.selector.needs_current_ratio)


def _lean_logprobs(model, state: StepState, rows: np.ndarray) -> np.ndarray:
    """The current policy's log-probs of ``rows`` (flat layout), no grad, no entropy, no stats."""
    cfg = state.learner
    was_training = model.training
    model.eval()
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
    model.train(was_training)
    return cur


def _select(state: StepState, current: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The selector's bool mask over the whole batch layout, from every rank's (positions, current
    log-probs) of this mini-batch; the same on every rank."""
    mine, cur_mine = current
    pos, cur, old, adv = (
        torch.from_numpy(x)
        for x in concat_gathered(
            state.all_gather,
            mine.astype(np.float64),
            cur_mine.astype(np.float64),
            state.old[mine].astype(np.float64),
            state.advantages[mine].astype(np.float64),
        )
    )
    # Canonical token order (the batch layout), so a seeded random selection does not depend on how the
    # rows were split into micro-batches or ranks.
    order = torch.argsort(pos)
    pos, cur, old, adv = pos[order], cur[order], old[order], adv[order]
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
    on_policy: bool,
) -> None:
    """The micro-batch's loss (a part of its mini-batch's, global normaliser ``norm``), backward, stats."""
    batch, algo = state.batch, state.algo
    loss_cfg = algo.policy_loss
    mask = mb.response_mask
    old = logp.detach() if on_policy else to_padded(state.old, mb)
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
