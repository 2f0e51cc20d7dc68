"""From ragged prompt+response rows to padded micro-batches and per-response-token log-probs.

Pure torch over any HF causal LM; the learner and the reference share it, so their log-probs are
computed the same way (same temperature, same chunking).

Layout, worked example. Two rows, prompt lengths [3, 2], sequences [p p p r r] and [p p r r r]:
    input_ids       [[p p p r r], [p p r r r]]     (right-padded to L = 5, attention_mask marks real)
    response pos.   row 0 predicts its r's from positions 2, 3; row 1 from positions 1, 2, 3
    per-token out   (b, R) with R = max response length = 3, ``response_mask`` [[1 1 0], [1 1 1]]
Only the hidden states at response positions go through the LM head (chunked), never (b, L, V).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.logprobs import logprobs_and_entropy, logprobs_from_hidden
from schemas.batches import TrainBatch


@dataclass
class MicroBatch:
    rows: np.ndarray  # int64 [b]: rows of the TrainBatch
    input_ids: torch.Tensor  # int64 [b, L]
    attention_mask: torch.Tensor  # int64 [b, L]
    positions: torch.Tensor  # int64 [b, R]: position whose output predicts response token t
    labels: torch.Tensor  # int64 [b, R]
    response_mask: torch.Tensor  # bool [b, R]
    flat_index: np.ndarray  # int64 [sum r]: where this micro-batch's tokens sit in the batch's flat arrays


def make_micro_batch(batch: TrainBatch, rows: np.ndarray, *, pad_id: int = 0) -> MicroBatch:
    rows = np.asarray(rows, dtype=np.int64)
    seq_len = batch.sequences.lengths[rows]
    p_len = batch.prompt_lengths[rows].astype(np.int64)
    r_len = seq_len - p_len
    b, L, R = rows.shape[0], int(seq_len.max()), max(int(r_len.max()), 1)
    input_ids = np.full((b, L), pad_id, dtype=np.int64)
    attn = np.arange(L)[None, :] < seq_len[:, None]
    sub = batch.sequences.take(rows)
    input_ids[attn] = sub.values  # row-major fill of the valid prefix of each row
    t = np.arange(R)[None, :]
    resp_mask = t < r_len[:, None]
    positions = np.where(resp_mask, p_len[:, None] - 1 + t, 0)
    labels = np.take_along_axis(input_ids, np.minimum(positions + 1, L - 1), axis=1) * resp_mask
    r_off = batch.response_offsets
    flat_index = (r_off[rows][:, None] + t)[resp_mask]
    return MicroBatch(
        rows=rows,
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attn.astype(np.int64)),
        positions=torch.from_numpy(positions),
        labels=torch.from_numpy(labels),
        response_mask=torch.from_numpy(resp_mask),
        flat_index=flat_index,
    )


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Hugging Face's activation checkpointing of every transformer block, non-reentrant.

    Non-reentrant: PyTorch's recommended variant, which recomputes through ordinary autograd (so the
    gradient hooks DeepSpeed puts on parameters fire as without checkpointing) and accepts the keyword
    arguments HF passes to each block. The switch only acts in training mode (``ppo_update`` puts the model in train mode for the loss forwards; its no-grad passes
    run in eval mode and store nothing anyway)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"learner.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def to_padded(flat: np.ndarray, mb: MicroBatch) -> torch.Tensor:
    """Flat per-response-token values (batch order) -> (b, R) float32, zeros at padding."""
    out = torch.zeros(mb.response_mask.shape, dtype=torch.float32)
    out[mb.response_mask] = torch.from_numpy(np.ascontiguousarray(flat[mb.flat_index], dtype=np.float32))
    return out


def response_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    full_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(b, R) log-probs of the response tokens (and entropies), zero at padding.

    ``full_logits`` runs the whole model (needed when the LM head is sharded, e.g. ZeRO-3); otherwise
    only response positions go through the LM head, chunked. No KV cache: one pass, nothing to reuse
    (building it cost ~1% of a learner step).
    """
    mask = mb.response_mask
    labels = mb.labels[mask]
    if full_logits:
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits
        picked = logits[torch.arange(logits.shape[0])[:, None], mb.positions][mask]
        lp, ent = logprobs_and_entropy(
            picked, labels, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy
        )
    else:
        hidden = model.base_model(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False
        ).last_hidden_state
        picked = hidden[torch.arange(hidden.shape[0])[:, None], mb.positions][mask]
        weight = model.get_output_embeddings().weight
        lp, ent = logprobs_from_hidden(
            picked, weight, labels, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy
        )
    out_lp = torch.zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, lp)
    out_ent = None if ent is None else torch.zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, ent)
    return out_lp, out_ent


def micro_batches(
    rows: np.ndarray, size: int, *, lengths: np.ndarray | None = None, token_budget: int | None = None
) -> list[np.ndarray]:
    """Rows cut into forward/backward micro-batches.

    Fixed (``token_budget`` None): ``size`` rows at a time, in order. Dynamic batching: rows sorted by
    sequence length (``lengths``, indexed by row id), longest first, and cut greedily so that rows x
    longest row <= ``token_budget`` padded tokens (a row longer than the budget goes alone). Sorting puts
    similar lengths together, so little compute goes to padding; the losses are normalised by global
    counts, so the update does not depend on how rows are cut (tests/unit/test_ppo_update.py)."""
    if token_budget is None:
        return [rows[i : i + size] for i in range(0, rows.shape[0], size)]
    if lengths is None:
        raise ValueError("dynamic micro-batching needs the sequence lengths")
    order = rows[np.argsort(-lengths[rows], kind="stable")]
    parts: list[np.ndarray] = []
    start = 0
    for i in range(1, order.shape[0] + 1):
        # sorted longest first: the first row of a part is its longest
        if i == order.shape[0] or (i - start + 1) * int(lengths[order[start]]) > token_budget:
            parts.append(order[start:i])
            start = i
    return parts


@torch.no_grad()
def batch_logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    rows: np.ndarray,
    *,
    micro_batch_size: int,
    temperature: float,
    with_entropy: bool = True,
    full_logits: bool = False,
    token_budget: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """No-grad log-probs (and entropies) of ``rows`` as flat float32 arrays over the whole batch layout.

    Positions of rows not in ``rows`` are left at 0.
    """
    total = int(batch.response_lengths.sum())
    logp = np.zeros(total, dtype=np.float32)
    ent = np.zeros(total, dtype=np.float32) if with_entropy else None
    rows = np.asarray(rows, dtype=np.int64)
    for part in micro_batches(
        rows, micro_batch_size, lengths=batch.sequences.lengths, token_budget=token_budget
    ):
        mb = make_micro_batch(batch, part)
        lp, en = response_logprobs(
            model, mb, temperature=temperature, with_entropy=with_entropy, full_logits=full_logits
        )
        logp[mb.flat_index] = lp[mb.response_mask].numpy()
        if ent is not None:
            ent[mb.flat_index] = en[mb.response_mask].numpy()
    return logp, ent
