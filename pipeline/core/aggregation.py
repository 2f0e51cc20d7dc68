"""Loss aggregation: how per-token terms become one scalar, and the global normaliser that makes the sum
of micro-batch losses equal the mini-batch loss however the batch is split (micro-batches, ranks).

Deviation from verl (``agg_loss``): ``seq-mean-token-sum-norm`` divides by (number of sequences x
``seq_norm_length``) (Dr.GRPO); verl divides the token sum by the max length only, which scales with the
batch size. Padding positions are zeroed with ``torch.where`` so inf/NaN garbage there cannot leak.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


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
