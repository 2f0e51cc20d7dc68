"""Reward functions written for verl or TRL, used unchanged as covrl verifiers.

Two function shapes are accepted beside the ``Verifier`` class API, told apart by their parameter names
when the import path is resolved (config load, before any actor starts)::

    # verl: one sample per call, keyword arguments
    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict: ...

    # TRL: one call per batch, keyword arguments; dataset columns as lists
    def reward_func(prompts, completions, **kwargs) -> list[float | None]: ...

verl's dict result must have a ``score`` key; its other numeric (or bool) values become
``verifier/<source>/info/<key>/mean`` metrics. A TRL function receives ``prompts`` and ``completions``
(plain strings), the columns ``ground_truth`` and ``data_source``, and one list per key of the rows'
extras (``None`` where a row lacks the key); a ``None`` in its result scores that sample 0 with the
reason. A spec's ``options`` are passed as extra keyword arguments on every call (verl's
``reward_kwargs``). Both run inside the verifier pool's worker processes like any plug-in, so a raise,
hang, crash or non-finite score costs only that sample.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pipeline.data.verifiers.base import (
    DEFAULT_ROUTE,
    InfoScore,
    Score,
    VerifierLoadError,
    resolve_verifier_class,
    route_key,
)
from schemas.verifier_config import VerifierConfig

VERL, TRL = "verl", "trl"
ACCEPTED_SHAPES = (
    "  - a class with score(prompts, responses, ground_truths, extras) -> list[Score | float]\n"
    "  - a verl-style function compute_score(data_source, solution_str, ground_truth, extra_info=None)"
    " -> float | dict with a 'score' key\n"
    "  - a TRL-style reward function f(prompts, completions, **kwargs) -> list[float | None]"
)
_VERL_ARGS = ("data_source", "solution_str", "ground_truth")
_TRL_COLUMNS = ("prompts", "completions", "ground_truth", "data_source")
# Arguments TRL's trainer passes that a verifier cannot: token ids and trainer state.
_TRL_UNAVAILABLE = ("completion_ids", "trainer_state", "log_extra", "log_metric")


def refusal(path: str, why: str) -> VerifierLoadError:
    return VerifierLoadError(f"verifier {path!r}: {why}. Accepted plug-in shapes:\n{ACCEPTED_SHAPES}")


def _signature(fn: Callable[..., Any], path: str) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as err:
        raise refusal(path, f"its signature cannot be read ({err})") from None


def _by_keyword(sig: inspect.Signature) -> dict[str, inspect.Parameter]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: p for name, p in sig.parameters.items() if p.kind in kinds}


def detect_shape(fn: Callable[..., Any], path: str, options: Mapping[str, Any]) -> str:
    """``VERL`` or ``TRL`` for a reward function (with its options as extra keyword arguments), else a
    ``VerifierLoadError`` naming ``path`` and listing the accepted shapes."""
    sig = _signature(fn, path)
    named = _by_keyword(sig)
    shown = f"{getattr(fn, '__name__', type(fn).__name__)}{sig}"
    positional_only = [
        n
        for n, p in sig.parameters.items()
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty
    ]
    if positional_only:
        raise refusal(path, f"{shown}: {positional_only} are positional-only; both shapes pass keywords")
    is_verl, is_trl = "solution_str" in named, "completions" in named
    if is_verl and is_trl:
        raise refusal(path, f"{shown} names both 'solution_str' (verl) and 'completions' (TRL); keep one")
    if not (is_verl or is_trl):
        raise refusal(
            path, f"{shown} takes neither 'solution_str' (verl) nor 'completions' (TRL) as a keyword argument"
        )
    shape = VERL if is_verl else TRL
    try:
        if shape == VERL:
            sig.bind(**dict.fromkeys(_VERL_ARGS), **options)
        else:
            sig.bind_partial(**dict.fromkeys(n for n in _TRL_COLUMNS[:2] if n in named), **options)
    except TypeError as err:
        raise refusal(path, f"{shown} cannot be called with options {sorted(options)} ({err})") from None
    if shape == TRL:
        missing = [
            n
            for n, p in named.items()
            if n in _TRL_UNAVAILABLE and p.default is inspect.Parameter.empty and n not in options
        ]
        if missing:
            raise refusal(path, f"{shown} requires {missing}, which covrl's verifier does not have")
    return shape


class RewardFunction:
    """A verl- or TRL-style reward function behind the ``Verifier`` API (built in the worker process)."""

    takes_data_sources = True  # base.call_score passes the samples' data sources by keyword

    def __init__(self, fn: Callable[..., Any], path: str, options: Mapping[str, Any]):
        self.fn, self.path, self.options = fn, path, dict(options)
        self.shape = detect_shape(fn, path, self.options)
        sig = inspect.signature(fn)
        self._named = set(_by_keyword(sig))
        self._required = {
            n for n, p in _by_keyword(sig).items() if p.default is inspect.Parameter.empty
        } - set(self.options)
        self._any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        self.label = f"reward function {path!r}"

    def missing_columns(self, columns: Iterable[str]) -> list[str]:
        """Arguments without a default that neither the samples' columns nor the options provide."""
        return sorted(self._required - set(_TRL_COLUMNS) - set(columns)) if self.shape == TRL else []

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[Mapping[str, Any]],
        data_sources: Sequence[str] | None = None,
    ) -> list[Score]:
        sources = list(data_sources) if data_sources is not None else [""] * len(responses)
        if self.shape == VERL:
            return [
                self._verl_one(s, r, g, e) for s, r, g, e in zip(sources, responses, ground_truths, extras)
            ]
        return self._trl(prompts, responses, ground_truths, extras, sources)

    def _verl_one(self, source: str, response: str, truth: str, extra: Mapping[str, Any]) -> Score:
        kwargs: dict[str, Any] = {"data_source": source, "solution_str": response, "ground_truth": truth}
        if "extra_info" in self._named or self._any_keyword:
            kwargs["extra_info"] = dict(extra)
        out = self.fn(**kwargs, **self.options)
        if isinstance(out, Mapping):
            if "score" not in out:
                raise ValueError(f"{self.label} returned a dict without a 'score' key (keys: {sorted(out)})")
            info = {str(k): float(v) for k, v in out.items() if k != "score" and _is_number(v)}
            info = {k: v for k, v in info.items() if math.isfinite(v)}
            return InfoScore(_number(out["score"], self.label), None, info)
        return Score(_number(out, self.label))

    def _trl(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[Mapping[str, Any]],
        sources: list[str],
    ) -> list[Score]:
        columns: dict[str, list[Any]] = {
            "prompts": list(prompts),
            "completions": list(responses),
            "ground_truth": list(ground_truths),
            "data_source": sources,
        }
        for key in sorted({k for e in extras for k in e} - set(columns)):
            columns[key] = [e.get(key) for e in extras]
        missing = self.missing_columns(columns)
        if missing:
            raise ValueError(
                f"{self.label} needs the column(s) {missing}; these samples have {sorted(columns)} "
                "(a row's extra_info / extra keys become columns)"
            )
        kwargs = columns if self._any_keyword else {k: v for k, v in columns.items() if k in self._named}
        out = self.fn(**(kwargs | self.options))  # an option wins over an extras column of its name
        try:
            values = None if isinstance(out, str | bytes | Mapping) else list(out)
        except TypeError:
            values = None
        if values is None:
            raise ValueError(f"{self.label} returned {type(out).__name__}; return a list of floats")
        if len(values) != len(responses):
            raise ValueError(f"{self.label} returned {len(values)} rewards for {len(responses)} completions")
        return [
            Score(0.0, f"{self.label} returned None for this sample")
            if v is None
            else Score(_number(v, self.label))
            for v in values
        ]


def check_columns(config: VerifierConfig, rows: Sequence[Mapping[str, Any]], split: str) -> None:
    """Before Ray starts: every row routed to a TRL-style function has the columns it names without a
    default (a row's extras keys), so a missing column is a config-load error, not a per-sample one."""
    named = {DEFAULT_ROUTE: ("verifier.default", config.default)}
    named |= {source: (f"verifier.routes.{source}", spec) for source, spec in config.routes.items()}
    plugins = {}
    for key, (where, spec) in named.items():
        factory = resolve_verifier_class(spec.name)
        if getattr(factory, "func", None) is RewardFunction:
            plugins[key] = (where, factory(spec.options))
    for i, row in enumerate(rows if plugins else ()):
        key = route_key(row["data_source"], config.routes)
        if key not in plugins:
            continue
        where, plugin = plugins[key]
        missing = plugin.missing_columns(row.get("extra") or {})
        if missing:
            raise VerifierLoadError(
                f"{where}: {plugin.label} needs the column(s) {missing}, but {split} row {i} "
                f"(data_source {row['data_source']!r}) has extras {sorted(row.get('extra') or {})}; "
                "add them to the rows' extra_info, or give those arguments a default"
            )


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, str | bytes)


def _number(value: Any, label: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{label} returned {type(value).__name__} {value!r:.60}; return a number")
    return float(value)
