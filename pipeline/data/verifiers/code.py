"""The ``code`` verifier: run a candidate Python program against test cases, each in the sandbox
(``pipeline.data.verifiers.sandbox``: what it contains and what it allows, docs/sandbox.md).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from pipeline.data.verifiers.base import Score, Verifier, register_verifier
from pipeline.data.verifiers.sandbox import (
    RunResult,
    SandboxLimits,
    run_python,
    sandbox_capabilities,
)


@dataclass(frozen=True)
class TestCase:
    stdin: str = ""
    expected_stdout: str | None = None  # None: pass = exit code 0 (assert-style)
    test_code: str = ""  # appended to the program (assert-style)


_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(response: str) -> str:
    """The last fenced code block of a response (```python ... ```), or the whole response if none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def parse_tests(ground_truth: str, extra: dict[str, Any] | None = None) -> list[TestCase]:
    """Test cases from ``extra['tests']`` or the ground truth, in any of these forms:

    ``{"inputs": [...], "outputs": [...]}`` (APPS/TACO), ``[{"input": ..., "output": ...}, ...]`` (also
    ``stdin``/``stdout`` keys), ``{"test_code": "assert f(1) == 2"}``, or plain assert code as the string.
    """
    spec: Any = (extra or {}).get("tests", ground_truth)
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return [TestCase(test_code=spec)]
    if isinstance(spec, dict) and "test_code" in spec:
        return [TestCase(test_code=str(spec["test_code"]))]
    if isinstance(spec, dict) and "inputs" in spec and "outputs" in spec:
        if len(spec["inputs"]) != len(spec["outputs"]):
            raise ValueError("code tests: 'inputs' and 'outputs' must have the same length")
        return [TestCase(str(i), str(o)) for i, o in zip(spec["inputs"], spec["outputs"])]
    if isinstance(spec, dict) and "tests" in spec:
        spec = spec["tests"]
    if isinstance(spec, list) and all(isinstance(t, dict) for t in spec):
        return [
            TestCase(str(t.get("input", t.get("stdin", ""))), str(t.get("output", t.get("stdout", ""))))
            for t in spec
        ]
    raise ValueError(
        "code tests: expected {'inputs': [...], 'outputs': [...]}, a list of {'input', 'output'} dicts, "
        "{'test_code': ...} or assert code"
    )


def _same_output(got: str, want: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(got) == norm(want)


@register_verifier("code")
class CodeVerifier(Verifier):
    """Score = 1 if the program passes every test (``partial_credit``: the fraction passed), else 0 with
    the first failure as reason. Keep ``total_wall_s`` below ``verifier.timeout_s``. Limits per test run:
    ``memory_mb`` (per process, and for all processes together where a memory cgroup is available),
    ``max_procs``, ``disk_mb`` (everything written), ``wall_s`` and ``cpu_s``."""

    def __init__(
        self,
        *,
        wall_s: float = 5.0,
        cpu_s: int | None = None,
        memory_mb: int = 512,
        max_procs: int = 16,
        disk_mb: int = 64,
        total_wall_s: float = 8.0,
        partial_credit: bool = False,
        python: str | None = None,
    ):
        self.limits = SandboxLimits(
            wall_s=wall_s,
            cpu_s=cpu_s or max(1, int(wall_s)),
            memory_mb=memory_mb,
            max_procs=max_procs,
            disk_mb=disk_mb,
        )
        self.total_wall_s, self.partial_credit, self.python = total_wall_s, partial_credit, python
        sandbox_capabilities(python)  # fail at construction (SandboxUnavailable), not per sample

    def score(self, prompts, responses, ground_truths, extras) -> list[Score]:
        return [self.score_one(r, g, e) for r, g, e in zip(responses, ground_truths, extras)]

    def score_one(self, response: str, ground_truth: str, extra: dict[str, Any] | None = None) -> Score:
        try:
            tests = parse_tests(ground_truth, extra)
        except ValueError as err:
            return Score(0.0, str(err))
        program, passed, first_failure = extract_program(response), 0, None
        deadline = time.monotonic() + self.total_wall_s
        for i, test in enumerate(tests):
            if time.monotonic() >= deadline:
                first_failure = first_failure or f"time budget {self.total_wall_s} s exhausted at test {i}"
                break
            source = program if not test.test_code else f"{program}\n\n{test.test_code}\n"
            result = run_python(source, stdin=test.stdin, limits=self.limits, python=self.python)
            failure = self._failure(result, test, i)
            if failure is None:
                passed += 1
                continue
            if result.leftovers:  # never reward a program that leaves processes behind
                return Score(0.0, failure)
            first_failure = first_failure or failure
            if not self.partial_credit:
                break
        if passed == len(tests):
            return Score(1.0)
        return Score(passed / len(tests) if self.partial_credit else 0.0, first_failure)

    def _failure(self, result: RunResult, test: TestCase, i: int) -> str | None:
        if result.setup_error:
            return f"sandbox could not start on test {i}: {result.setup_error}"
        if result.oom_killed:
            return (
                f"out of memory on test {i}: the sandbox's processes together exceeded "
                f"{self.limits.memory_mb} MiB (+ {self.limits.disk_mb} MiB for files) and were killed"
            )
        if result.timed_out:
            return f"timeout after {self.limits.wall_s} s on test {i}"
        if result.leftovers:
            return f"left {result.leftovers} process(es) running after test {i} (killed)"
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
            return f"runtime error on test {i}: {last[:200]}"
        if (
            test.expected_stdout is not None
            and not test.test_code
            and not _same_output(result.stdout, test.expected_stdout)
        ):
            return f"wrong output on test {i}"
        return None
