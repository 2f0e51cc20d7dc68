"""Verifier plug-ins: built-in scoring, loading by name / import path, routing, and worker isolation.

The ``Hostile`` plug-in below is loaded by the isolation tests by import path (``<this module>:Hostile``)
inside the spawned worker process; it misbehaves according to the response text.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import uuid

import numpy as np
import psutil
import pytest

from pipeline.data.verifiers import (
    Score,
    VerifierLoadError,
    load_verifier,
    register_verifier,
    registered_verifiers,
)
from pipeline.data.verifiers.base import CRASH, ERROR, OK, TIMEOUT, coerce_scores, merge_stats, summarize
from pipeline.data.verifiers.isolation import IsolatedScorer
from schemas.verifier_config import FormatRewardSpec, VerifierConfig, VerifierSpec

HERE = __name__


def _misbehave(response: str) -> None:
    """What a hostile plug-in does when the response asks: raise, hang, or kill its process."""
    if response == "raise":
        raise ValueError("plug-in bug")
    if response == "hang":
        time.sleep(60)
    if response == "exit":
        os._exit(3)
    if response == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if response == "sysexit":
        sys.exit(2)


class Hostile:
    """Scores 1 when response == ground truth, unless the response asks it to misbehave."""

    def __init__(self, fail_init: bool = False):
        if fail_init:
            raise RuntimeError("cannot load the model")

    def score(self, prompts, responses, ground_truths, extras):
        (response,) = responses
        _misbehave(response)
        if response == "basexc":
            from math_verify.errors import TimeoutException

            raise TimeoutException("sympy took too long")
        if response == "nan":
            return [float("nan")]
        if response.startswith("import:"):  # a plug-in's lazy first import, e.g. of math-verify
            __import__(response.split(":", 1)[1])
            return [Score(1.0)]
        if response == "huge":
            return [1e39]  # a finite Python float, but inf as float32 (the actor's score dtype)
        return [Score(float(response == ground_truths[0]), None if response == ground_truths[0] else "wrong")]


def hostile_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl-style twin of ``Hostile``."""
    _misbehave(solution_str)
    return math.nan if solution_str == "nan" else float(solution_str == ground_truth)


def hostile_reward_func(prompts, completions, ground_truth, **kwargs):
    """TRL-style twin of ``Hostile``."""
    for completion in completions:
        _misbehave(completion)
    return [math.nan if c == "nan" else float(c == g) for c, g in zip(completions, ground_truth)]


def _score(name: str, responses: list[str], truths: list[str], **options) -> list[Score]:
    verifier = load_verifier({"name": name, "options": options})
    return verifier.score([""] * len(responses), responses, truths, [{}] * len(responses))


# --------------------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        (r"The answer is \boxed{1/2}.", "0.5", 1.0),
        (r"So we get $\boxed{\frac{1}{2}}$", r"\frac{1}{2}", 1.0),
        ("The final answer is 0.5", r"\frac12", 1.0),
        (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),  # equivalent expressions
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        # Several boxes are read together as a tuple (3, 1/3): no credit for hedging.
        (r"first \boxed{3}, no wait: \boxed{1/3}", r"\frac{1}{3}", 0.0),
        (r"\boxed{3}", "0.5", 0.0),
        ("I am not sure.", "2", 0.0),
    ],
)
def test_math_verifier(response, truth, expected):
    (got,) = _score("math", [response], [truth])
    assert got.score == expected
    assert (got.reason is None) == (expected == 1.0)


def test_math_extraction_is_configurable():
    # Only LaTeX extraction: a bare '0.5' with no anchor or $...$ still parses via unanchored LaTeX,
    # but expression-only extraction cannot read \frac.
    (latex,) = _score("math", [r"$\frac{1}{2}$"], ["0.5"], extraction=["latex"])
    (expr,) = _score("math", [r"$\frac{1}{2}$"], ["0.5"], extraction=["expr"])
    assert latex.score == 1.0 and expr.score == 0.0
    with pytest.raises(VerifierLoadError, match="extraction"):
        load_verifier({"name": "math", "options": {"extraction": ["latex", "regex"]}})


def test_exact_and_numeric():
    got = _score("exact", ["  Paris ", "paris  france", "Lyon"], ["paris", "Paris France", "Paris"])
    assert [s.score for s in got] == [1.0, 1.0, 0.0]
    strict = _score("exact", ["Paris"], ["paris"], case_sensitive=True)
    assert strict[0].score == 0.0 and "wrong answer" in strict[0].reason
    marked = _score(
        "exact", ["blah ANSWER: Blue", "no marker"], ["blue", "blue"], answer_pattern=r"ANSWER:\s*(\w+)"
    )
    assert [s.score for s in marked] == [1.0, 0.0]

    responses = ["so x = 1,000.2", "it is 3/4", "I give up", "about 7.0001", "50%", "1e3"]
    truths = ["1000.2", "0.75", "1", "7", "0.5", "1000"]
    assert [s.score for s in _score("numeric", responses, truths)] == [1, 1, 0, 0, 1, 1]
    assert [s.score for s in _score("numeric", responses, truths, rel_tol=1e-3)] == [1, 1, 0, 1, 1, 1]
    assert _score("numeric", ["7.5"], ["7"], abs_tol=0.5)[0].score == 1.0
    assert _score("numeric", ["I give up"], ["1"])[0].reason == "no number found"


def test_arithmetic_uses_the_task_scorer():
    from pipeline.data.addition import score_response

    response = "5+8+0=13;4+7+1=12;3+6+1=10;#1023"
    got = _score("arithmetic", [response, "5+8=13;#13", "no answer"], ["1023", "14", "1"])
    assert [s.score for s in got] == [1.0, 0.0, 0.0]
    assert tuple(got[2]) == score_response("no answer", "1")


def test_format_reward_wrapper():
    inner = {"name": "numeric"}
    fmt = {
        "name": "format",
        "options": {"inner": inner, "pattern": r"\\boxed\{", "bonus": 0.2, "penalty": 0.5},
    }
    got = _score(fmt["name"], [r"\boxed{4}", "4", r"\boxed{5}", "5"], ["4"] * 4, **fmt["options"])
    assert [round(s.score, 6) for s in got] == [1.2, 0.5, 0.2, -0.5]
    assert got[1].reason.startswith("format:")
    gated = _score(
        "format", [r"\boxed{4}", "4"], ["4", "4"], inner=inner, pattern=r"\\boxed", penalty=0.1, gate=True
    )
    assert [s.score for s in gated] == [1.0, -0.1]
    with pytest.raises(ValueError, match="not a valid regex"):
        FormatRewardSpec(pattern="(unclosed")


# ---------------------------------------------------------------------------------------------- loading


def test_load_by_name_and_import_path():
    assert {"math", "exact", "numeric", "arithmetic", "code", "format"} <= set(registered_verifiers())
    mine = load_verifier(
        VerifierSpec(name="examples.custom_verifier.my_verifier:MyVerifier", options={"bonus": 0.5})
    )
    got = mine.score(["q", "q"], ["reasoning...\nParis.", "London"], ["paris", "paris"], [{}, {}])
    assert got[0].score == 1.5 and got[1].score == 0.0 and got[1].reason


def test_load_errors_say_what_to_do():
    with pytest.raises(
        VerifierLoadError, match=r"unknown verifier 'maths'.*Did you mean 'math'.*package.module:ClassName"
    ):
        load_verifier("maths")
    with pytest.raises(VerifierLoadError, match="cannot import module 'no_such_pkg.mod'"):
        load_verifier("no_such_pkg.mod:Thing")
    with pytest.raises(VerifierLoadError, match=r"has no attribute 'Nope'.*MyVerifier"):
        load_verifier("examples.custom_verifier.my_verifier:Nope")
    with pytest.raises(VerifierLoadError, match=r"options \['tolerance'\] do not fit NumericVerifier"):
        load_verifier({"name": "numeric", "options": {"tolerance": 1}})


def test_register_and_coerce():
    @register_verifier("test_len_ok")
    class LenOk:
        def score(self, prompts, responses, ground_truths, extras):
            return [(len(r) < 3, "long" if len(r) >= 3 else None) for r in responses]

    got = load_verifier("test_len_ok").score(["", ""], ["ab", "abcd"], ["", ""], [{}, {}])
    assert coerce_scores(got, 2, "LenOk") == [Score(1.0, None), Score(0.0, "long")]
    with pytest.raises(ValueError, match="returned 1 results for 2 samples"):
        coerce_scores([1.0], 2, "X")
    with pytest.raises(ValueError, match="non-finite"):
        coerce_scores([float("inf")], 1, "X")
    with pytest.raises(ValueError, match="not finite in float32"):
        coerce_scores([-1e39], 1, "X")
    assert coerce_scores([3e38], 1, "X") == [Score(3e38, None)]  # the largest float32s still fit


def test_score_too_large_for_float32_scores_zero_with_the_reason():
    """1e39 passes Python's finite check but is inf in the actor's float32 scores, which would crash the
    driver's "rewards must be finite" check: it must score 0 with the reason, like NaN."""
    from actors.verifier import VerifierWorker

    worker = VerifierWorker(VerifierConfig(default=VerifierSpec(name=f"{HERE}:Hostile")))
    try:
        scores, reasons, stats = worker.score(["", ""], ["huge", "a"], ["x", "a"], ["s", "s"])
    finally:
        worker.close()
    assert scores.tolist() == [0.0, 1.0] and np.isfinite(scores).all()
    assert "not finite in float32" in reasons[0] and stats["verifier/errors"] == 1


def test_stats_summarize_and_merge():
    kinds = [OK, ERROR, TIMEOUT, CRASH]
    stats = summarize([1.0, 0.0, 0.0, 0.0], kinds, ["a", "a", "b", "b"], ["math", "math", "code", "code"])
    assert stats["verifier/a/score_mean"] == 0.5 and stats["verifier/a/errors"] == 1
    assert (
        stats["verifier/b/timeouts"] == 1
        and stats["verifier/b/crashes"] == 1
        and stats["verifier/b/errors"] == 1
    )
    assert stats["verifier/by_verifier/code/count"] == 2 and stats["verifier/errors"] == 2
    other = summarize([1.0, 1.0], [OK, OK], ["a", "a"], ["math", "math"])
    merged = merge_stats([stats, other])
    assert merged["verifier/a/count"] == 4 and merged["verifier/a/score_mean"] == 0.75
    assert merged["verifier/count"] == 6 and merged["verifier/score_mean"] == pytest.approx(3 / 6)


# ------------------------------------------------------------------------------------ routing + isolation


def test_routing_by_data_source():
    from actors.verifier import VerifierWorker

    config = VerifierConfig(
        default=VerifierSpec(name="arithmetic"),
        routes={"gsm": VerifierSpec(name="numeric"), "trivia": VerifierSpec(name="exact")},
    )
    worker = VerifierWorker(config)
    try:
        scores, reasons, stats = worker.score(
            prompts=["p"] * 4,
            responses=["so 42", " PARIS ", "1+1=2;#2", "so 41"],
            ground_truths=["42", "paris", "2", "42"],
            data_sources=["gsm", "trivia", "synthetic", "gsm"],
        )
    finally:
        worker.close()
    assert scores.dtype == np.float32 and scores.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert reasons[:3] == [None, None, None] and "wrong answer" in reasons[3]
    assert stats["verifier/gsm/score_mean"] == 0.5 and stats["verifier/gsm/errors"] == 0
    assert stats["verifier/by_verifier/arithmetic/count"] == 1 and stats["verifier/synthetic/timeouts"] == 0


def test_isolation_contains_raise_hang_and_crash():
    spec = VerifierSpec(name=f"{HERE}:Hostile")
    scorer = IsolatedScorer({"h": spec}, timeout_s=1.0)
    try:
        pid0 = scorer.worker_pids()[0]
        responses = [
            "a",
            "raise",
            "b",
            "hang",
            "c",
            "exit",
            "d",
            "segv",
            "e",
            "sysexit",
            "basexc",
            "nan",
            "f",
        ]
        start = time.monotonic()
        out = scorer.score(
            ["h"] * len(responses),
            [""] * len(responses),
            responses,
            ["a", "x", "b", "x", "c"] + list("xdxexxxf"),
        )
        elapsed = time.monotonic() - start
    finally:
        pids = scorer.worker_pids()
        scorer.close()
    kinds = [o.kind for o in out]
    assert [o.score for o in out] == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1]
    assert kinds == [OK, ERROR, OK, TIMEOUT, OK, CRASH, OK, CRASH, OK, ERROR, ERROR, ERROR, OK]
    assert "ValueError: plug-in bug" in out[1].reason and "timeout" in out[3].reason
    assert "exit code 3" in out[5].reason and "signal 11" in out[7].reason
    assert (
        "SystemExit" in out[9].reason
        and "TimeoutException" in out[10].reason
        and "non-finite" in out[11].reason
    )
    assert scorer.restarts == 3 and pids[0] != pid0 and not psutil.pid_exists(pid0)
    assert elapsed < 30, "one hang costs one timeout, not the batch"
    assert not any(psutil.pid_exists(p) for p in pids), "close() leaves no worker behind"


def test_isolation_contains_reward_functions_of_both_shapes():
    """verl- and TRL-style functions run in the same worker processes as class plug-ins: a raise, hang,
    crash or NaN scores that sample 0 with the reason; the other samples are scored."""
    specs = {
        "verl": VerifierSpec(name=f"{HERE}:hostile_compute_score"),
        "trl": VerifierSpec(name=f"{HERE}:hostile_reward_func"),
    }
    scorer = IsolatedScorer(specs, timeout_s=1.0)
    responses = ["a", "raise", "hang", "exit", "nan", "b"]
    try:
        out = {
            key: scorer.score([key] * 6, [""] * 6, responses, list("axxxxb"), None, ["src"] * 6)
            for key in specs
        }
    finally:
        scorer.close()
    for key, got in out.items():
        assert [o.score for o in got] == [1, 0, 0, 0, 0, 1], key
        assert [o.kind for o in got] == [OK, ERROR, TIMEOUT, CRASH, ERROR, OK], key
        assert "ValueError: plug-in bug" in got[1].reason and "non-finite" in got[4].reason, key
    assert scorer.restarts == 4


def test_a_slow_first_import_does_not_count_against_the_sample(tmp_path, monkeypatch):
    """A plug-in's first import of a heavy module (math-verify: seconds on a loaded machine) is one-off
    worker set-up, not the sample's run: it must not turn into a timeout. The limit on imports is the
    worker's start-up bound, so an import that never finishes is still stopped."""
    slow, hang = f"covrl_slow_{uuid.uuid4().hex}", f"covrl_hang_{uuid.uuid4().hex}"
    (tmp_path / f"{slow}.py").write_text("import time\ntime.sleep(2.5)\n")  # 2.5x the per-sample limit
    (tmp_path / f"{hang}.py").write_text("import time\ntime.sleep(3600)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the spawned worker inherits sys.path
    scorer = IsolatedScorer({"h": VerifierSpec(name=f"{HERE}:Hostile")}, timeout_s=1.0, startup_timeout_s=8.0)
    try:
        responses = [f"import:{slow}", "a", f"import:{hang}", "b", "hang", "c"]
        out = scorer.score(["h"] * 6, [""] * 6, responses, ["x", "a", "x", "b", "x", "c"])
    finally:
        scorer.close()
    assert [o.kind for o in out] == [OK, OK, TIMEOUT, OK, TIMEOUT, OK], [o.reason for o in out]
    assert "import" in out[2].reason and "8.0 s" in out[2].reason
    assert out[4].reason == "timeout: no result within 1.0 s"  # the import time is not carried over


def test_isolation_two_workers_keep_order():
    scorer = IsolatedScorer({"h": VerifierSpec(name=f"{HERE}:Hostile")}, timeout_s=1.0, workers=2)
    try:
        responses = ["a", "exit", "b", "c", "raise", "d"]
        out = scorer.score(["h"] * 6, [""] * 6, responses, ["a", "x", "b", "c", "x", "d"], [{}] * 6)
    finally:
        scorer.close()
    assert [o.score for o in out] == [1, 0, 1, 1, 0, 1]
    assert [o.kind for o in out] == [OK, CRASH, OK, OK, ERROR, OK]


def test_isolation_load_error_surfaces_at_start():
    with pytest.raises(VerifierLoadError, match="cannot load the model"):
        IsolatedScorer(
            {"h": VerifierSpec(name=f"{HERE}:Hostile", options={"fail_init": True})}, timeout_s=1.0
        )


def test_code_verifier_without_isolation_fails_closed():
    """Where no namespace can be made, the code verifier refuses to run code instead of running it in view
    of the host's files (here: no unshare(1) at all)."""
    from pipeline.data.verifiers.sandbox import SandboxUnavailable, probe_capabilities

    with pytest.raises(SandboxUnavailable, match=r"refuses to run them.*unshare\(1\) not found"):
        probe_capabilities(unshare=None)
    with pytest.raises(SandboxUnavailable, match=r"refuses to run them.*/bin/false --mount"):
        probe_capabilities(unshare="/bin/false")  # there, but every namespace is refused
