"""Prompt datasets: JSONL/Parquet loading, column mapping, chat templates, length filter, resumable stream.

What: ``load_split`` turns files (or the built-in synthetic task when ``data.train_files`` is empty) into
rows ``{prompt, ground_truth, data_source, id, extra, templated}`` with the prompt rendered to the text the
generator sees (``extra``: the row's ``extra_info`` / ``extra`` dict, handed to its verifier as the sample's
extras; ``templated``: the text came from the chat template, so it is encoded without adding special
tokens, as ``apply_chat_template(tokenize=True)`` does). verl's parquet files load as they are: ``prompt``
as chat messages, ``reward_model.ground_truth``, ``data_source``, ``extra_info``;
plus a ``LoadReport`` of what was read, skipped and filtered. ``PromptStream`` serves batches in a
deterministic per-epoch order and resumes exactly from ``state_dict()``.

Why so strict: a silently dropped or mis-mapped row corrupts an RL run without any error. A malformed row
either raises ``DataError`` naming file, 1-based row and field, or (``on_bad_row='skip'``) is counted.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.data import tasks
from schemas.data_config import DataConfig

_JSONL_EXT = {".jsonl", ".json", ".ndjson"}
_PARQUET_EXT = {".parquet", ".pq"}
_GT_FALLBACKS = ("ground_truth", "reward_model.ground_truth")
_EXTRA_KEYS = ("extra_info", "extra")  # verl's name first
_MISSING = object()


class DataError(ValueError):
    """A dataset problem the user must fix (bad file, bad row, empty dataset, mismatched resume)."""


class _BadRow(Exception):
    def __init__(self, field_name: str, problem: str):
        super().__init__(problem)
        self.field_name, self.problem = field_name, problem


@dataclass
class LoadReport:
    """Counts of one split's load: nothing is dropped without being counted here."""

    split: str
    source: str
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    loaded: int = 0
    bad_rows: int = 0
    too_long: int = 0
    length_checked: bool = False
    bad_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"{self.split}: {self.loaded} prompts from {self.source} ({self.rows_read} rows read, "
            f"{self.bad_rows} malformed skipped, {self.too_long} over the prompt-length limit)"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def load_split(
    cfg: DataConfig, split: Literal["train", "eval"], *, tokenizer: Any = None
) -> tuple[list[dict], LoadReport]:
    """Rows of ``split`` and the load report.

    A split without files uses the synthetic task's train / held-out split when ``train_files`` is empty;
    ``eval`` with ``train_files`` but no ``eval_files`` gives no rows (held-out eval off, said in ``source``). ``tokenizer`` (optional)
    renders chat prompts and measures prompt length for ``max_prompt_tokens``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'eval'")
    patterns = cfg.train_files if split == "train" else cfg.eval_files
    if not patterns and not cfg.train_files:
        report = LoadReport(split=split, source=f"synthetic task ({tasks.describe(cfg.synthetic)})")
        records: Iterator[tuple[str, int, Any]] = (
            ("<synthetic>", i + 1, r) for i, r in enumerate(tasks.make_rows(cfg.synthetic, split))
        )
    elif not patterns:
        return [], LoadReport(split=split, source="none (data.eval_files is empty: held-out eval off)")
    else:
        paths = resolve_files(patterns)
        report = LoadReport(split=split, source=f"{len(paths)} file(s)", files=[str(p) for p in paths])
        records = (rec for p in paths for rec in _read_file(p, cfg.format))

    rows = []
    for path, row_no, rec in records:
        report.rows_read += 1
        try:
            if isinstance(rec, _BadRow):
                raise rec
            row = _normalize(rec, cfg, tokenizer, default_id=f"{Path(path).stem}-{row_no}")
        except _BadRow as bad:
            msg = f"{path}: row {row_no}: field '{bad.field_name}': {bad.problem}"
            if cfg.on_bad_row == "error":
                raise DataError(
                    f"{msg}. Fix the row, map the column (data.prompt_key / data.ground_truth_key / "
                    "data.data_source_key), or set data.on_bad_row='skip' to skip and count such rows."
                ) from None
            report.bad_rows += 1
            if len(report.bad_examples) < 5:
                report.bad_examples.append(msg)
            continue
        rows.append(row)

    rows = _filter_long(rows, limit=cfg.max_prompt_tokens, tokenizer=tokenizer, report=report)
    report.loaded = len(rows)
    if not rows:
        raise DataError(
            f"no usable prompts in the {split} data ({report.source}; {report.rows_read} rows read, "
            f"{report.bad_rows} malformed, {report.too_long} longer than max_prompt_tokens="
            f"{cfg.max_prompt_tokens}): check the files, the column mapping, or raise data.max_prompt_tokens"
        )
    return rows, report


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand globs; every pattern must match at least one existing file."""
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(str(Path(pat).expanduser()))) if glob.has_magic(pat) else [pat]
        if not hits or not all(Path(h).expanduser().is_file() for h in hits):
            raise DataError(f"data file not found: {pat!r} (paths are relative to the working directory)")
        out.extend(Path(h).expanduser() for h in hits)
    return out


def _read_file(path: Path, fmt: str) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(path, 1-based row number, record dict or _BadRow)``."""
    if fmt == "auto":
        ext = path.suffix.lower()
        fmt = "jsonl" if ext in _JSONL_EXT else "parquet" if ext in _PARQUET_EXT else ""
        if not fmt:
            raise DataError(
                f"{path}: cannot tell the format from {ext!r}: set data.format to 'jsonl' or 'parquet'"
            )
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
        for i, rec in enumerate(records):
            yield str(path), i + 1, rec
        return
    # Bytes, decoded line by line: one badly encoded row is a bad row (named, skippable), not a failed file.
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield str(path), i + 1, _BadRow("<encoding>", _not_utf8(raw, exc))
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                rec = _BadRow("<json>", f"invalid JSON ({exc.msg} at column {exc.colno})")
            if not isinstance(rec, dict | _BadRow):
                rec = _BadRow("<row>", f"expected a JSON object, got {type(rec).__name__}")
            yield str(path), i + 1, rec


def _not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    return (
        f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte offset {exc.start}); "
        "re-encode the file as UTF-8"
    )


def get_field(rec: dict, dotted: str) -> Any:
    """Value at a dotted path (``reward_model.ground_truth``); a literal key with dots wins; else _MISSING."""
    if dotted in rec:
        return rec[dotted]
    cur: Any = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def render_prompt(
    prompt: str | list[dict], tokenizer: Any, *, wrap_plain: bool = False, field_name: str = "prompt"
) -> tuple[str, bool]:
    """(text the generator sees, whether a chat template produced it).

    Messages use ``tokenizer.apply_chat_template(add_generation_prompt=True)``, as HF renders them. A
    tokenizer without a template cannot render messages: ``DataError`` naming the model and the field
    (``field_name``), since any made-up rendering would train on prompts the model was never given.
    ``tokenizer=None`` (loading rows only to inspect them, never to generate) joins the contents by
    newlines. Plain strings pass through unless ``wrap_plain`` and the tokenizer has a template.
    """
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    if isinstance(prompt, str):
        if not (wrap_plain and has_template):
            return prompt, False
        prompt = [{"role": "user", "content": prompt}]
    if has_template:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), True
    if tokenizer is not None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"data.prompt_key {field_name!r}: the prompts are chat messages but the model's tokenizer "
            f"({name}) has no chat_template to render them; use a chat model (model.path), add a "
            "chat_template to its tokenizer_config.json, or give plain-string prompts"
        )
    return "\n".join(m["content"] for m in prompt), False


def _normalize(rec: dict, cfg: DataConfig, tokenizer: Any, *, default_id: str) -> dict:
    prompt = get_field(rec, cfg.prompt_key)
    if prompt is _MISSING:
        raise _BadRow(cfg.prompt_key, f"missing (row keys: {sorted(rec)[:10]})")
    _check_prompt(prompt, cfg.prompt_key)
    keys = (cfg.ground_truth_key,) if cfg.ground_truth_key else _GT_FALLBACKS
    gt = next((v for v in (get_field(rec, k) for k in keys) if v is not _MISSING and v is not None), _MISSING)
    if gt is _MISSING:
        raise _BadRow(" or ".join(keys), f"missing or null (row keys: {sorted(rec)[:10]})")
    if isinstance(gt, bool) or not isinstance(gt, str | int | float):
        raise _BadRow(keys[0], f"expected a string or number, got {type(gt).__name__}")
    source = get_field(rec, cfg.data_source_key)
    if source is _MISSING or source is None:
        source = cfg.default_data_source
    elif not isinstance(source, str):
        raise _BadRow(cfg.data_source_key, f"expected a string, got {type(source).__name__}")
    rid = rec.get("id")
    text, templated = render_prompt(
        prompt, tokenizer, wrap_plain=cfg.wrap_plain_prompts, field_name=cfg.prompt_key
    )
    return {
        "prompt": text,
        "ground_truth": str(gt),
        "data_source": source,
        "id": str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool) else default_id,
        "extra": _extras(rec),
        "templated": templated,
    }


def _extras(rec: dict) -> dict:
    """The row's free fields for its verifier: verl's ``extra_info`` and covrl's ``extra``, merged.

    A key in both with different values is refused rather than one silently winning.
    """
    out: dict = {}
    for key in _EXTRA_KEYS:
        value = rec.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise _BadRow(
                key, f"expected an object (dict) of extras for the verifier, got {type(value).__name__}"
            )
        clash = sorted(k for k in value if k in out and out[k] != value[k])
        if clash:
            raise _BadRow(key, f"keys {clash} are also in {_EXTRA_KEYS[0]!r} with other values")
        out.update(value)
    return out


def _check_prompt(prompt: Any, key: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _BadRow(key, "empty prompt")
        return
    if not isinstance(prompt, list) or not prompt:
        raise _BadRow(key, f"expected a string or a non-empty list of messages, got {type(prompt).__name__}")
    for j, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _BadRow(f"{key}[{j}]", "each message must be {'role': str, 'content': str}")


def encode_rows(rows: list[dict], tokenizer: Any) -> list[list[int]]:
    """Prompt token ids of ``rows``, as the generator gets them: plain prompts with the tokenizer's special
    tokens (e.g. BOS, as in SFT), chat-templated ones without (the template wrote its own), exactly as HF's
    ``apply_chat_template(tokenize=True)`` encodes them. Batched per kind."""
    flags = np.asarray([bool(r.get("templated")) for r in rows], dtype=bool)
    ids: list[list[int]] = [[] for _ in rows]
    for is_tpl in (False, True):
        idx = np.flatnonzero(flags == is_tpl)
        if idx.size:
            enc = tokenizer([rows[i]["prompt"] for i in idx], add_special_tokens=not is_tpl)["input_ids"]
            for i, e in zip(idx, enc, strict=True):
                ids[i] = list(e)
    return ids


def _filter_long(rows: list[dict], *, limit: int | None, tokenizer: Any, report: LoadReport) -> list[dict]:
    """Drop prompts over ``limit`` tokens, counted as the generator will encode them."""
    if limit is None or tokenizer is None or not rows:
        return rows
    report.length_checked = True
    lengths = np.asarray([len(e) for e in encode_rows(rows, tokenizer)], dtype=np.int64)
    keep = lengths <= limit
    report.too_long = int((~keep).sum())
    return [rows[i] for i in np.flatnonzero(keep)]


class PromptStream:
    """Endless batches over ``rows``: epoch ``e`` visits a permutation seeded by ``seed + e``.

    ``next_batch`` crosses epoch boundaries inside a batch; ``state_dict`` is ``(epoch, position)`` with the
    position normalised (an epoch consumed to the end is stored as the next epoch at 0), so resuming at any
    point, the boundary included, continues with exactly the rows an uninterrupted stream would give.
    """

    def __init__(self, rows: list[dict], *, shuffle: bool = True, seed: int = 0):
        if not rows:
            raise DataError("PromptStream needs at least one row (the dataset is empty)")
        self._rows, self.shuffle, self.seed = rows, shuffle, seed
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    @classmethod
    def from_config(cls, rows: list[dict], cfg: DataConfig) -> PromptStream:
        return cls(rows, shuffle=cfg.shuffle, seed=cfg.seed)

    def __len__(self) -> int:
        return len(self._rows)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self._rows)
            self._order = (
                np.random.default_rng(self.seed + self.epoch).permutation(n) if self.shuffle else np.arange(n)
            )
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self, n: int) -> list[dict]:
        """The next ``n`` rows (copies), continuing into the next epoch when this one runs out."""
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        out: list[dict] = []
        while len(out) < n:
            order = self._epoch_order()
            take = min(n - len(out), len(order) - self.position)
            out.extend(dict(self._rows[i]) for i in order[self.position : self.position + take])
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "n_rows": len(self._rows),
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume; refuses a state saved over a different dataset size, seed or shuffle setting."""
        for key, mine in (("n_rows", len(self._rows)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if key in state and state[key] != mine:
                raise DataError(
                    f"cannot resume the prompt stream: saved {key}={state[key]!r} but now {mine!r} "
                    "(the dataset or data.seed/data.shuffle changed since the checkpoint)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self._rows):
            raise DataError(f"corrupt prompt-stream state: epoch={epoch}, position={position}")
        if position == len(self._rows):
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position
