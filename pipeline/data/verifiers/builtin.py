"""Built-in verifiers: ``math`` (math-verify), ``exact``, ``numeric``, ``arithmetic``, ``countdown`` and the
``format`` wrapper.

All are plain batch scorers (see ``base.py``); none handles its own isolation. Each returns
``Score(0.0, reason)`` for an expected failure (no answer found, wrong answer) so that logs say why.
"""

from __future__ import annotations

import math
import re
import threading
from fractions import Fraction
from typing import Any

from pipeline.data.verifiers.base import InfoScore, Score, Verifier, load_verifier, register_verifier

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?%?")


def _last_match(pattern: re.Pattern[str] | None, text: str) -> str | None:
    """Group 1 (or the whole match) of the last match of ``pattern`` in ``text``; ``text`` if no pattern."""
    if pattern is None:
        return text
    found = None
    for found in pattern.finditer(text):  # noqa: B007 - want the last one
        pass
    if found is None:
        return None
    return found.group(1) if pattern.groups else found.group(0)


@register_verifier("math")
class MathVerifier(Verifier):
    """Mathematical equivalence with HuggingFace ``math-verify``: LaTeX, ``\\boxed{}``, fractions, sets,
    equivalent expressions (``\\boxed{1/2}`` == ``0.5`` == ``\\frac{1}{2}``).

    Options: ``extraction`` — which answer forms to look for in the response, any of ``"latex"``
    (``LatexExtractionConfig``) and ``"expr"`` (``ExprExtractionConfig``); ``boxed_priority`` — 0 takes
    ``\\boxed{}`` before "final answer is" anchors, 50 after (math-verify's default), -1 ignores boxes;
    ``try_extract_without_anchor`` — also accept an unanchored last expression; ``float_rounding`` and
    ``strict`` are passed to ``math_verify.verify``; ``timeout_s`` — math-verify's own SIGALRM limit per
    parse/compare (only usable on a main thread; elsewhere the actor's per-sample timeout applies).
    """

    def __init__(
        self,
        extraction: tuple[str, ...] | list[str] = ("latex", "expr"),
        *,
        boxed_priority: int = 0,
        try_extract_without_anchor: bool = True,
        float_rounding: int = 6,
        strict: bool = True,
        timeout_s: int = 5,
    ):
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        unknown = set(extraction) - {"latex", "expr"}
        if unknown or not extraction:
            raise ValueError(
                f"math: extraction must be a non-empty subset of ['latex', 'expr'], got {list(extraction)}"
            )
        configs: list[Any] = []
        for kind in extraction:
            if kind == "latex":
                configs.append(
                    LatexExtractionConfig(
                        boxed_match_priority=boxed_priority,
                        try_extract_without_anchor=try_extract_without_anchor,
                    )
                )
            else:
                configs.append(ExprExtractionConfig(try_extract_without_anchor=try_extract_without_anchor))
        self._configs = configs
        self._gold_configs = [LatexExtractionConfig(), ExprExtractionConfig()]
        self.float_rounding = float_rounding
        self.strict = strict
        self.timeout_s = int(timeout_s)

    def score(self, prompts, responses, ground_truths, extras) -> list[Score]:
        return [self.score_one(r, g) for r, g in zip(responses, ground_truths)]

    def score_one(self, response: str, ground_truth: str) -> Score:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException

        # math-verify's timeout is SIGALRM-based and raises off the main thread: disable it there.
        limit = self.timeout_s if threading.current_thread() is threading.main_thread() else None
        try:
            gold = parse(ground_truth, self._gold_configs, parsing_timeout=limit)
            if not gold:
                gold = parse(f"${ground_truth}$", self._gold_configs, parsing_timeout=limit)
            if not gold:
                return Score(0.0, f"ground truth {ground_truth[:40]!r} is not parsable by math-verify")
            pred = parse(response, self._configs, parsing_timeout=limit)
            if not pred:
                return Score(0.0, "no parsable answer")
            ok = verify(
                gold, pred, float_rounding=self.float_rounding, strict=self.strict, timeout_seconds=limit
            )
        except TimeoutException:  # derives from BaseException: `except Exception` would miss it
            return Score(0.0, "math-verify timeout")
        return Score(1.0) if ok else Score(0.0, f"wrong answer {str(pred[-1])[:40]!r}")


def normalize_text(
    text: str, *, strip: bool = True, case_sensitive: bool = False, collapse_whitespace: bool = True
) -> str:
    """The comparison form used by ``exact``: optionally stripped, lower-cased and whitespace-collapsed."""
    if collapse_whitespace:
        text = " ".join(text.split())
    if strip:
        text = text.strip()
    if not case_sensitive:
        text = text.casefold()
    return text


@register_verifier("exact")
class ExactVerifier(Verifier):
    """Normalised string equality. ``answer_pattern`` (regex; group 1 if it has one) picks the answer out
    of the response, its last match wins; without it the whole response is compared."""

    def __init__(
        self,
        *,
        strip: bool = True,
        case_sensitive: bool = False,
        collapse_whitespace: bool = True,
        answer_pattern: str | None = None,
    ):
        self._norm = {
            "strip": strip,
            "case_sensitive": case_sensitive,
            "collapse_whitespace": collapse_whitespace,
        }
        self._pattern = re.compile(answer_pattern, re.DOTALL) if answer_pattern else None

    def score(self, prompts, responses, ground_truths, extras) -> list[Score]:
        out = []
        for response, truth in zip(responses, ground_truths):
            answer = _last_match(self._pattern, response)
            if answer is None:
                out.append(Score(0.0, "no answer matching answer_pattern"))
            elif normalize_text(answer, **self._norm) == normalize_text(truth, **self._norm):
                out.append(Score(1.0))
            else:
                out.append(Score(0.0, f"wrong answer {answer.strip()[:40]!r}"))
        return out


def parse_number(text: str) -> float | None:
    """The number ``text`` spells (``1,234``, ``-0.5``, ``3e-2``, ``1/2``, ``50%`` -> 0.5), else None."""
    text = text.strip().rstrip(".").replace(" ", "")
    scale = 0.01 if text.endswith("%") else 1.0
    text = text.rstrip("%").replace(",", "")
    if not text:
        return None
    try:
        if "/" in text:
            num, _, den = text.partition("/")
            return float(Fraction(num) / Fraction(den)) * scale
        value = float(text) * scale
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


@register_verifier("numeric")
class NumericVerifier(Verifier):
    """Numeric equality within tolerance: ``|pred - truth| <= max(abs_tol, rel_tol * |truth|)``.

    The prediction is group 1 of the last ``answer_pattern`` match, or the last number in the response.
    """

    def __init__(self, *, abs_tol: float = 1e-6, rel_tol: float = 1e-9, answer_pattern: str | None = None):
        if abs_tol < 0 or rel_tol < 0:
            raise ValueError("numeric: abs_tol and rel_tol must be >= 0")
        self.abs_tol, self.rel_tol = abs_tol, rel_tol
        self._pattern = re.compile(answer_pattern, re.DOTALL) if answer_pattern else None

    def _prediction(self, response: str) -> str | None:
        if self._pattern is not None:
            return _last_match(self._pattern, response)
        numbers = [m.group(0) for m in _NUMBER.finditer(response) if any(c.isdigit() for c in m.group(0))]
        return numbers[-1] if numbers else None

    def score(self, prompts, responses, ground_truths, extras) -> list[Score]:
        out = []
        for response, truth in zip(responses, ground_truths):
            target = parse_number(truth)
            if target is None:
                out.append(Score(0.0, f"ground truth {truth[:40]!r} is not a number"))
                continue
            raw = self._prediction(response)
            pred = None if raw is None else parse_number(raw)
            if pred is None:
                out.append(Score(0.0, "no number found"))
            elif abs(pred - target) <= max(self.abs_tol, self.rel_tol * abs(target)):
                out.append(Score(1.0))
            else:
                out.append(Score(0.0, f"wrong answer {pred:g} (expected {target:g})"))
        return out


@register_verifier("arithmetic")
class ArithmeticVerifier(Verifier):
    """The built-in synthetic task's verifier (``pipeline.data.addition.score_response``): the answer after ``#``."""

    def score(self, prompts, responses, ground_truths, extras) -> list[Score]:
        from pipeline.data.addition import score_response  # lazy: keeps this module light to import

        return [Score(*score_response(r, g)) for r, g in zip(responses, ground_truths)]


@register_verifier("countdown")
class CountdownVerifier(Verifier):
    """The countdown task's verifier (``pipeline.data.countdown.score_response``): replays the written steps
    against the puzzle in the ground truth (``8,6,4>10``): arithmetic, each number used once, final value
    and ``#`` answer equal to the target. Every failure kind has its own reason."""

    def score(self, prompts, responses, ground_truths, extras) -> list[Score]:
        from pipeline.data.countdown import score_response  # lazy: keeps this module light to import

        return [Score(*score_response(r, g)) for r, g in zip(responses, ground_truths)]


@register_verifier("format")
class FormatReward(Verifier):
    """Compose a format term with any verifier: ``inner + bonus`` when ``pattern`` is found in the response,
    ``inner - penalty`` when not (with ``gate``: just ``-penalty``, the inner reward is withheld).

    ``inner`` is a verifier spec ``{"name": ..., "options": {...}}``. Usually configured once for all routes
    via ``verifier.format_reward``.
    """

    def __init__(
        self,
        *,
        inner: dict[str, Any],
        pattern: str,
        bonus: float = 0.0,
        penalty: float = 0.0,
        gate: bool = False,
    ):
        self.inner = load_verifier(inner)
        self._pattern = re.compile(pattern, re.DOTALL)
        self.bonus, self.penalty, self.gate = bonus, penalty, gate

    takes_data_sources = True  # passed on to the inner verifier when it takes them

    def score(self, prompts, responses, ground_truths, extras, data_sources=None) -> list[Score]:
        from pipeline.data.verifiers.base import call_score, coerce_scores

        formatted = [self._pattern.search(r) is not None for r in responses]
        inner_idx = [i for i, ok in enumerate(formatted) if ok or not self.gate]
        pick = lambda xs: [xs[i] for i in inner_idx]  # noqa: E731
        sources = [""] * len(responses) if data_sources is None else data_sources
        raw = call_score(
            self.inner, pick(prompts), pick(responses), pick(ground_truths), pick(extras), pick(sources)
        )
        inner = coerce_scores(raw, len(inner_idx), getattr(self.inner, "label", type(self.inner).__name__))
        by_index = dict(zip(inner_idx, inner))
        out = []
        for i, ok in enumerate(formatted):
            base = by_index.get(i, Score(0.0, None))
            if ok:
                out.append(InfoScore(base.score + self.bonus, base.reason, getattr(base, "info", None)))
            else:
                reason = "format: pattern not found" + (f"; {base.reason}" if base.reason else "")
                out.append(InfoScore(base.score - self.penalty, reason, getattr(base, "info", None)))
        return out
