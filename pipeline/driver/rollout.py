"""From data rows to the typed ``PromptBatch`` the generators take, and what the driver needs from the
data layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.datasets import encode_rows
from schemas.batches import PromptBatch, Ragged


@dataclass
class DataSource:
    """A resumable train stream and the held-out rows, with the tokenizer that encodes both."""

    stream: Any  # pipeline.data.datasets.PromptStream
    eval_rows: list[dict[str, Any]]
    tokenizer: Any


def encode_prompts(rows: list[dict[str, Any]], tokenizer: Any, step: int) -> PromptBatch:
    texts = [r["prompt"] for r in rows]
    ids = encode_rows(rows, tokenizer)
    return PromptBatch(
        step=step,
        prompt_ids=np.asarray([int(r["index"]) for r in rows], dtype=np.int64),
        tokens=Ragged.from_lists(ids),
        texts=texts,
        ground_truths=[str(r["ground_truth"]) for r in rows],
        data_sources=[str(r.get("data_source", "default")) for r in rows],
        extras=[r.get("extra") or {} for r in rows],
    )
