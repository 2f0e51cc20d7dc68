"""The token inspector: the step's highest-covariance tokens, decoded with their context, so a user can
read which tokens drive the entropy collapse (``metrics.inspector_every``; saved under
``RUN_DIR/inspector/``)."""

from __future__ import annotations

from typing import Any

from schemas.batches import ScoredBatch, TrainBatch

CONTEXT_TOKENS = 48


def inspect_tokens(
    tokenizer: Any, train: TrainBatch, scored: ScoredBatch, top_tokens: list[dict[str, float]]
) -> list[dict[str, Any]]:
    """``top_tokens`` (row, response position, covariance, ...) with the token, its preceding context, the
    whole response and its reward."""
    out = []
    for t in top_tokens:
        row, pos = int(t["row"]), int(t["t"])
        seq = train.sequences.row(row)
        at = int(train.prompt_lengths[row]) + pos
        out.append(
            t
            | {
                "token": tokenizer.decode([int(seq[at])]),
                "context": tokenizer.decode(seq[max(0, at - CONTEXT_TOKENS) : at].tolist()),
                "response": scored.rollout.response_texts[row],
                "reward": float(scored.rewards[row]),
            }
        )
    return out
