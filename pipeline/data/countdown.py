"""The built-in countdown task: reach a target from a few small numbers with + - *, each number used once.

Why this task: unlike addition (one carry chain per problem), many problems here have several valid step
sequences (41% with the defaults, 1.77 on average), and finding one is a search. A warm-started model solves far more problems in 16 samples than
in one, so RL has room that only exploration can turn into accuracy; GRPO narrows onto a few paths and
that room shrinks (docs/tasks.md has the calibration). Example (3 numbers)::

    prompt   8,6,4>10=
    response 8+6=14;14-4=10;#10      (then EOS)

Rules (replayed by ``score_response``): each step ``a<op>b=r;`` combines two values from a pool that starts
as the given numbers; both operands leave the pool and ``r`` joins it, so an intermediate result can be used
by a later step, once, like a given number. Every given number must be used, the last result must be the
target and the ``#`` answer must equal it. Values are non-negative integers: a step whose result would be
negative is malformed (a negative intermediate never reaches a positive target that non-negative steps
cannot: c-(a-b) is (c+b)-a; and it would make ``-`` both an operator and a sign for the character model).

A *problem* is (multiset of numbers, target); it is listed with its numbers in a seeded random order. Its
*solutions* are the distinct step sequences in canonical form (commutative operands larger first), which
is how the reference responses are written; the scorer also accepts the other operand order.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from schemas.data_config import CountdownTaskConfig

ANSWER_MARK = "#"
OPS = ("+", "-", "*")
#: Every character a prompt or response of this task can contain (the tiny tokenizer's alphabet).
SYMBOLS: tuple[str, ...] = tuple("0123456789") + (*OPS, ",", ">", "=", ";", ANSWER_MARK)
_INT = r"(0|[1-9][0-9]*)"  # [0-9], not \d: \d also matches non-ASCII digits
_STEP = re.compile(rf"{_INT}([+\-*]){_INT}={_INT}")
_NEGATIVE_STEP = re.compile(rf"{_INT}([+\-*]){_INT}=-{_INT}")
_PUZZLE = re.compile(rf"{_INT}(?:,{_INT})*>{_INT}")


class Problem(NamedTuple):
    """One puzzle: the numbers as shown in the prompt, the target and every canonical solution."""

    numbers: tuple[int, ...]
    target: int
    solutions: tuple[str, ...]  # e.g. ("6-4=2;8+2=10;", "8+6=14;14-4=10;", ...), sorted


def apply_op(a: int, op: str, b: int) -> int:
    """``a op b`` for op in ``+ - *``."""
    return a + b if op == "+" else a - b if op == "-" else a * b


def _chains(pool: tuple[int, ...]) -> list[tuple[int, str]]:
    """(final value, canonical steps) of every way to combine the sorted ``pool`` down to one value."""
    if len(pool) == 1:
        return [(pool[0], "")]
    out, seen = [], set()
    for i, j in itertools.combinations(range(len(pool)), 2):
        b, a = pool[i], pool[j]  # pool is sorted: a >= b, the canonical operand order
        rest = pool[:i] + pool[i + 1 : j] + pool[j + 1 :]
        for op in OPS:
            if (a, op, b) in seen:  # equal values in the pool give the same step
                continue
            seen.add((a, op, b))
            r = apply_op(a, op, b)
            step = f"{a}{op}{b}={r};"
            out.extend((v, step + tail) for v, tail in _chains(tuple(sorted((*rest, r)))))
    return out


@lru_cache(maxsize=4096)
def solutions_by_target(numbers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
    """Every reachable final value of ``numbers`` (order irrelevant) -> its distinct canonical solutions."""
    found: dict[int, set[str]] = {}
    for value, steps in _chains(tuple(sorted(numbers))):
        found.setdefault(value, set()).add(steps)
    return {v: tuple(sorted(s)) for v, s in found.items()}


def solve(numbers: tuple[int, ...] | list[int], target: int) -> tuple[str, ...]:
    """The canonical solutions (steps only, each ending in ``;``) of one puzzle; empty if unreachable."""
    return solutions_by_target(tuple(sorted(numbers))).get(target, ())


@lru_cache(maxsize=8)
def all_problems(cfg: CountdownTaskConfig) -> tuple[Problem, ...]:
    """Every problem of the settings in a fixed canonical order (by sorted numbers, then target), with its
    numbers shown in an order drawn from ``cfg.seed`` (the same whatever ``n_train``/``n_eval``)."""
    rng = np.random.default_rng([cfg.seed, 1])
    out = []
    for multiset in itertools.combinations_with_replacement(
        range(cfg.min_number, cfg.max_number + 1), cfg.numbers
    ):
        for target, sols in sorted(solutions_by_target(multiset).items()):
            if cfg.min_target <= target <= cfg.max_target:
                shown = tuple(int(x) for x in rng.permutation(multiset))
                out.append(Problem(shown, target, sols))
    return tuple(out)


def problem_count(cfg: CountdownTaskConfig) -> int:
    """How many distinct problems these settings allow."""
    return len(all_problems(cfg))


def check_sizes(cfg: CountdownTaskConfig) -> None:
    """Raise ``ValueError`` naming the fields when the splits ask for more problems than exist."""
    total = problem_count(cfg)
    need = cfg.n_eval + (cfg.n_train or 1)
    if need > total:
        raise ValueError(
            f"data.synthetic.n_eval = {cfg.n_eval}"
            + (f" + data.synthetic.n_train = {cfg.n_train}" if cfg.n_train else " (+ at least 1 to train on)")
            + f" exceeds the {total} countdown problems of data.synthetic.numbers = {cfg.numbers}, numbers in "
            f"{cfg.min_number}..{cfg.max_number}, targets in {cfg.min_target}..{cfg.max_target}: lower "
            "n_eval/n_train or widen the ranges"
        )


@lru_cache(maxsize=8)
def _split(cfg: CountdownTaskConfig) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    check_sizes(cfg)
    problems = all_problems(cfg)
    order = np.random.default_rng(cfg.seed).permutation(len(problems))
    held_out = order[: cfg.n_eval]
    train = order[cfg.n_eval :] if cfg.n_train is None else order[cfg.n_eval : cfg.n_eval + cfg.n_train]
    return tuple(problems[i] for i in train), tuple(problems[i] for i in held_out)


def split_problems(cfg: CountdownTaskConfig, split: str) -> tuple[Problem, ...]:
    """Problems of ``split`` ('train' or 'eval'); the two are disjoint and fixed by ``cfg.seed``."""
    train, held_out = _split(cfg)
    if split == "train":
        return train
    if split == "eval":
        return held_out
    raise ValueError(f"unknown split {split!r}: use 'train' or 'eval'")


def puzzle_text(numbers: tuple[int, ...] | list[int], target: int) -> str:
    """``8,6,4>10``: the ground truth of a row (the verifier needs nothing else)."""
    return ",".join(map(str, numbers)) + f">{target}"


def make_prompt(numbers: tuple[int, ...] | list[int], target: int) -> str:
    """The prompt text, e.g. ``8,6,4>10=``."""
    return puzzle_text(numbers, target) + "="


def make_rows(cfg: CountdownTaskConfig, split: str) -> list[dict]:
    """Rows ``{prompt, ground_truth, data_source, id}`` of one split; the ground truth is the puzzle."""
    return [
        {
            "prompt": make_prompt(p.numbers, p.target),
            "ground_truth": puzzle_text(p.numbers, p.target),
            "data_source": cfg.data_source,
            "id": f"{cfg.data_source}-{split}-{i}",
        }
        for i, p in enumerate(split_problems(cfg, split))
    ]


def make_sft_texts(cfg: CountdownTaskConfig, split: str = "train") -> tuple[list[str], list[str]]:
    """(prompts, responses) with ONE solution per problem, drawn from ``cfg.seed`` (fixed per problem)."""
    problems = split_problems(cfg, split)
    rng = np.random.default_rng([cfg.seed, 2, 0 if split == "train" else 1])
    picks = [p.solutions[rng.integers(len(p.solutions))] for p in problems]
    return (
        [make_prompt(p.numbers, p.target) for p in problems],
        [s + f"{ANSWER_MARK}{p.target}" for p, s in zip(problems, picks, strict=True)],
    )


def reference_texts(cfg: CountdownTaskConfig, split: str) -> tuple[list[str], list[str], list[int]]:
    """(prompts, responses, problem index) with EVERY solution of each problem: the probability that a
    sample is one of them is the sum over a problem's rows (the bootstrap's teacher-forced pass@1)."""
    prompts, responses, index = [], [], []
    for i, p in enumerate(split_problems(cfg, split)):
        for s in p.solutions:
            prompts.append(make_prompt(p.numbers, p.target))
            responses.append(s + f"{ANSWER_MARK}{p.target}")
            index.append(i)
    return prompts, responses, index


def max_response_chars(cfg: CountdownTaskConfig) -> int:
    """Upper bound on the response length in characters (for generation budgets)."""
    top = cfg.max_number**cfg.numbers  # no value can exceed the product of the largest numbers
    step = 3 * len(str(top)) + 3  # a*b=r;
    return (cfg.numbers - 1) * step + len(ANSWER_MARK) + len(str(cfg.max_target))


def parse_puzzle(text: str) -> tuple[list[int], int] | None:
    """``"8,6,4>10"`` -> ([8, 6, 4], 10); None if ``text`` is not a puzzle."""
    text = text.strip()
    if _PUZZLE.fullmatch(text) is None:
        return None
    nums, _, target = text.partition(">")
    return [int(x) for x in nums.split(",")], int(target)


def score_response(response: str, ground_truth: str) -> tuple[float, str | None]:
    """Replay the written steps: ``(1.0, None)`` if they solve the puzzle ``ground_truth`` (``8,6,4>10``),
    else ``(0.0, reason)``. Pure and cheap: safe to call from any process.

    Reasons (stable prefixes): ``bad ground truth``, ``no marked answer``, ``malformed answer``,
    ``no steps``, ``malformed step``, ``wrong arithmetic``, ``number not available`` (reused or never
    given), ``unused number``, ``wrong final value``, ``wrong answer``.
    """
    puzzle = parse_puzzle(ground_truth)
    if puzzle is None:
        return 0.0, f"bad ground truth {ground_truth[:40]!r}: expected 'n1,n2,...>target'"
    numbers, target = puzzle
    text = response.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")].rstrip()
    body, mark, answer = text.rpartition(ANSWER_MARK)
    if not mark:
        return 0.0, "no marked answer"
    answer = answer.strip()
    if re.fullmatch("[0-9]+", answer) is None:
        return 0.0, f"malformed answer {answer[:20]!r}"
    if not body:
        return 0.0, "no steps before the answer"
    steps = body.split(";")
    if steps[-1]:  # every step ends with ';', the one before '#' included
        return 0.0, f"malformed step {len(steps)} {steps[-1][:30]!r} (a step ends with ';')"
    steps.pop()
    pool, last = Counter(numbers), None
    for n, step in enumerate(steps, start=1):
        m = _STEP.fullmatch(step)
        if m is None:
            why = " (values must not be negative)" if _NEGATIVE_STEP.fullmatch(step) else ""
            return 0.0, f"malformed step {n} {step[:30]!r}{why}"
        a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
        if apply_op(a, op, b) != r:
            return 0.0, f"wrong arithmetic in step {n}: {step} ({a}{op}{b} is {apply_op(a, op, b)})"
        for x in (a, b):
            if pool[x] == 0:
                return 0.0, f"number not available in step {n}: {x} (not given, or already used)"
            pool[x] -= 1
        pool[r] += 1
        last = r
    pool[last] -= 1
    left = sorted(pool.elements())
    if left:
        return 0.0, f"unused number(s) {left}: every given number must be used once"
    if last != target:
        return 0.0, f"wrong final value {last} (target {target})"
    if int(answer) != target:
        return 0.0, f"wrong answer {int(answer)} (target {target})"
    return 1.0, None
