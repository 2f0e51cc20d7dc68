"""The reward plug-in API: ``Score``, the ``Verifier`` base class, the registry and ``load_verifier``.

A verifier is a small class whose constructor takes its own options as keyword arguments and whose
batch method scores N samples at once::

    @register_verifier("len_ok")
    class LenOk(Verifier):
        def __init__(self, max_chars: int = 200):
            self.max_chars = max_chars

        def score(self, prompts, responses, ground_truths, extras):
            return [Score(float(len(r) <= self.max_chars)) for r in responses]

It is selected in config by its registered name or by import path ``package.module:ClassName`` (no
registration needed). An import path may also name a reward function written for verl
(``compute_score(data_source, solution_str, ground_truth, extra_info=None)``) or TRL
(``f(prompts, completions, **kwargs)``), used unchanged (``functions.py``). Plug-ins do not handle timeouts, crashes or isolation: the verifier actor runs them
in a worker process and scores a failing sample 0 with the reason recorded (see ``isolation.py``).

Also here, because the actor and the pool both need them without Ray: routing by data source
(``route_specs``) and the per-source / per-verifier statistics (``summarize``, ``merge_stats``).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from schemas.verifier_config import FormatRewardSpec, VerifierConfig, VerifierSpec

# Outcome kinds recorded per sample by the isolation layer (stable: they name metrics).
OK, ERROR, TIMEOUT, CRASH = "ok", "error", "timeout", "crash"
DEFAULT_ROUTE = "__default__"
# Scores travel as float32 (the actor's array, the driver's rewards): a larger magnitude becomes inf there.
FLOAT32_MAX = 3.4028234663852886e38


class Score(NamedTuple):
    """One sample's reward and, optionally, why (shown in logs; None when there is nothing to say)."""

    score: float
    reason: str | None = None


class InfoScore(Score):
    """A ``Score`` with named numbers about the sample (e.g. a verl result dict's other keys), logged as
    per-source means. Still a ``(score, reason)`` pair to code that unpacks or compares scores."""

    info: dict[str, float] | None

    def __new__(cls, score: float, reason: str | None = None, info: dict[str, float] | None = None):
        self = super().__new__(cls, score, reason)
        self.info = info
        return self


class Verifier:
    """Optional base class for plug-ins (any class with a matching ``score`` method works)."""

    def score(
        self,
        prompts: list[str],
        responses: list[str],
        ground_truths: list[str],
        extras: list[dict[str, Any]],
    ) -> list[Score]:
        """Score N samples; return N ``Score``s in order. Raising fails the whole call (the actor retries
        per sample), so prefer returning ``Score(0.0, reason)`` for an expected failure."""
        raise NotImplementedError


_REGISTRY: dict[str, type] = {}
_BUILTIN_MODULES = ("pipeline.data.verifiers.builtin", "pipeline.data.verifiers.code")


class VerifierLoadError(ValueError):
    """A verifier could not be found or constructed; the message says what to change in the config."""


def register_verifier(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` selectable in config as ``name``. Names must be unique."""

    def deco(cls: type) -> type:
        if not callable(getattr(cls, "score", None)):
            raise TypeError(f"{cls.__name__} has no score(prompts, responses, ground_truths, extras) method")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"verifier name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_verifiers() -> list[str]:
    """Sorted names of every registered verifier (built-ins included)."""
    _import_builtins()
    return sorted(_REGISTRY)


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def resolve_verifier_class(name: str) -> Callable[..., Any]:
    """What builds the verifier from its options: the class for a registered name or an import path
    ``package.module:ClassName``; for an import path naming a verl- or TRL-style reward function, a
    factory of its adapter (the function's shape is checked here, so a wrong one fails at config load)."""
    if ":" in name:
        return _import_plugin(name)
    _import_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise VerifierLoadError(
        f"unknown verifier {name!r}; registered: {', '.join(sorted(_REGISTRY))}.{hint} "
        "For your own class give its import path 'package.module:ClassName'."
    )


def _import_plugin(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise VerifierLoadError(f"verifier import path {path!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise VerifierLoadError(
            f"cannot import module {module_name!r} for verifier {path!r} ({type(err).__name__}: {err}); "
            "make sure it is importable where the verifier runs (installed, on PYTHONPATH, or in the "
            "job's working_dir)"
        ) from err
    from pipeline.data.verifiers import functions

    cls = getattr(module, attr, None)
    if cls is None:
        found = [
            n for n, v in vars(module).items() if inspect.isclass(v) and callable(getattr(v, "score", None))
        ]
        raise VerifierLoadError(
            f"module {module_name!r} has no attribute {attr!r}; classes there with a score method: {found or 'none'}"
        )
    if inspect.isclass(cls):
        if not callable(getattr(cls, "score", None)):
            raise functions.refusal(path, f"class {cls.__name__} has no score method")
        return cls
    if not callable(cls):
        raise functions.refusal(path, f"it is a {type(cls).__name__}, not a class or a function")
    functions.detect_shape(cls, path, {})
    return functools.partial(functions.RewardFunction, cls, path)


def load_verifier(spec: VerifierSpec | Mapping[str, Any] | str) -> Any:
    """Construct the verifier a spec names: ``load_verifier({'name': 'numeric', 'options': {'rel_tol': 1e-3}})``."""
    if isinstance(spec, str):
        spec = VerifierSpec(name=spec)
    elif not isinstance(spec, VerifierSpec):
        spec = VerifierSpec.model_validate(dict(spec))
    cls = resolve_verifier_class(spec.name)
    if isinstance(cls, functools.partial):  # a reward function: its options are call arguments
        return cls(spec.options)
    try:
        return cls(**spec.options)
    except TypeError as err:
        raise _options_error(spec, cls, err) from err
    except ValueError as err:
        raise VerifierLoadError(
            f"verifier {spec.name!r}: bad options ({err}); fix verifier.*.options in the config"
        ) from err


def _options_error(spec: VerifierSpec, cls: type, err: Exception) -> VerifierLoadError:
    try:
        signature = str(inspect.signature(cls))
    except (TypeError, ValueError):
        signature = "(...)"
    return VerifierLoadError(
        f"verifier {spec.name!r}: options {sorted(spec.options)} do not fit {cls.__name__}{signature} ({err}); "
        "fix verifier.*.options in the config"
    )


def check_verifiers(config: VerifierConfig) -> None:
    """Resolve every configured verifier (default and routes) and check its options against its constructor's
    signature, without constructing it (that happens in the verifier's worker processes). Run before any
    actor starts, so a typo fails at once; the error names the config field."""
    named = [("verifier.default", config.default)]
    named += [(f"verifier.routes.{source}", spec) for source, spec in config.routes.items()]
    for where, spec in named:
        try:
            cls = resolve_verifier_class(spec.name)
            if isinstance(cls, functools.partial):  # a reward function: shape and options checked here
                cls(spec.options)
                continue
            try:
                inspect.signature(cls).bind(**spec.options)
            except TypeError as err:
                raise _options_error(spec, cls, err) from None
            except ValueError:  # no introspectable signature: the worker's construction checks it
                pass
        except VerifierLoadError as err:
            raise VerifierLoadError(f"{where}: {err}") from None


def coerce_scores(raw: Any, n: int, who: str) -> list[Score]:
    """Turn a plug-in's return value into N ``Score``s finite in float32 (floats and (score, reason) pairs
    accepted)."""
    try:
        items = None if isinstance(raw, str | bytes) else list(raw)
    except TypeError:
        items = None
    if items is None or len(items) != n:
        got = type(raw).__name__ if items is None else f"{len(items)} results"
        raise ValueError(
            f"{who}.score returned {got} for {n} samples; return a list with one Score per sample"
        )
    out = []
    for item in items:
        info = getattr(item, "info", None)
        if isinstance(item, tuple) and len(item) == 2:
            value, reason = item
        else:
            value, reason = item, None
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{who}.score returned a non-finite score {value}; return a finite float")
        if abs(value) > FLOAT32_MAX:
            raise ValueError(
                f"{who}.score returned {value}, which is not finite in float32 (the reward dtype; "
                f"|score| <= {FLOAT32_MAX:.4g}); return a smaller score"
            )
        reason = None if reason is None else str(reason)
        out.append(InfoScore(value, reason, info) if info else Score(value, reason))
    return out


def call_score(
    plugin: Any,
    prompts: list[str],
    responses: list[str],
    ground_truths: list[str],
    extras: list[dict[str, Any]],
    data_sources: list[str],
) -> Any:
    """``plugin.score(...)``, with the samples' data sources for plug-ins that ask for them
    (``takes_data_sources``: reward functions, and wrappers around any plug-in)."""
    if getattr(plugin, "takes_data_sources", False):
        return plugin.score(prompts, responses, ground_truths, extras, data_sources=data_sources)
    return plugin.score(prompts, responses, ground_truths, extras)


def format_wrapped(spec: VerifierSpec, fmt: FormatRewardSpec | None) -> VerifierSpec:
    """``spec`` composed with the config-wide format reward (unchanged when there is none)."""
    if fmt is None:
        return spec
    return VerifierSpec(name="format", options={"inner": spec.model_dump(), **fmt.model_dump()})


def route_specs(config: VerifierConfig) -> dict[str, VerifierSpec]:
    """Route key -> effective spec: one per listed data source plus ``DEFAULT_ROUTE``."""
    specs = {source: format_wrapped(spec, config.format_reward) for source, spec in config.routes.items()}
    specs[DEFAULT_ROUTE] = format_wrapped(config.default, config.format_reward)
    return specs


def route_key(data_source: str, routes: Mapping[str, Any]) -> str:
    return data_source if data_source in routes else DEFAULT_ROUTE


def metric_name(text: str) -> str:
    """A data-source or verifier name made safe for a metric path (no '/', no spaces)."""
    return (text or "unknown").replace("/", "_").replace(" ", "_").replace(":", ".")


def summarize(
    scores: Sequence[float],
    kinds: Sequence[str],
    data_sources: Sequence[str],
    verifier_names: Sequence[str],
    infos: Sequence[Mapping[str, float] | None] | None = None,
) -> dict[str, float]:
    """Stable metrics for one scored batch.

    Per data source ``verifier/<source>/{count,score_mean,errors,timeouts,crashes}``, per verifier
    ``verifier/by_verifier/<name>/...`` and totals ``verifier/{count,score_mean,errors,timeouts,crashes}``.
    ``errors`` counts exceptions and crashed workers; ``crashes`` only the latter. Each key of the samples'
    ``Score.info`` adds ``<prefix>/info/<key>/{mean,count}`` over the samples that reported it.
    """
    groups: dict[str, list[int]] = {"verifier": list(range(len(scores)))}
    for i, (source, name) in enumerate(zip(data_sources, verifier_names)):
        groups.setdefault(f"verifier/{metric_name(source)}", []).append(i)
        groups.setdefault(f"verifier/by_verifier/{metric_name(name)}", []).append(i)
    stats: dict[str, float] = {}
    for prefix, idx in groups.items():
        ks = [kinds[i] for i in idx]
        stats[f"{prefix}/count"] = float(len(idx))
        stats[f"{prefix}/score_mean"] = float(sum(scores[i] for i in idx) / len(idx)) if idx else 0.0
        stats[f"{prefix}/errors"] = float(sum(k in (ERROR, CRASH) for k in ks))
        stats[f"{prefix}/timeouts"] = float(sum(k == TIMEOUT for k in ks))
        stats[f"{prefix}/crashes"] = float(sum(k == CRASH for k in ks))
        for key, values in _info_values(infos, idx).items():
            stats[f"{prefix}/info/{metric_name(key)}/mean"] = sum(values) / len(values)
            stats[f"{prefix}/info/{metric_name(key)}/count"] = float(len(values))
    return stats


def _info_values(
    infos: Sequence[Mapping[str, float] | None] | None, idx: list[int]
) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for i in idx if infos is not None else ():
        for key, value in (infos[i] or {}).items():
            values.setdefault(key, []).append(float(value))
    return values


def merge_stats(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine ``summarize``-style stats of disjoint chunks: counts add, means are count-weighted,
    ``*_s`` timings take the max (chunks ran concurrently)."""
    merged: dict[str, float] = {}
    weighted: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            if key.endswith("/score_mean") or (key.endswith("/mean") and "/info/" in key):
                count = part.get(_count_key(key), 0.0)
                weighted[key] = weighted.get(key, 0.0) + value * count
            elif key.endswith("_s"):
                merged[key] = max(merged.get(key, 0.0), value)
            else:
                merged[key] = merged.get(key, 0.0) + value
    for key, total in weighted.items():
        count = merged.get(_count_key(key), 0.0)
        merged[key] = total / count if count else 0.0
    return merged


def _count_key(mean_key: str) -> str:
    """The count a mean is taken over: ``.../score_mean`` -> ``.../count``, ``.../info/k/mean`` -> ``.../info/k/count``."""
    return mean_key[: -len("score_mean" if mean_key.endswith("/score_mean") else "mean")] + "count"
