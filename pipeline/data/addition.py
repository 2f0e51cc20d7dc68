"""The built-in verifiable reasoning task: n-digit addition with a digit-by-digit carry chain.

Why this task: it needs no hub, a 1.8M-parameter model learns it in about a minute on 2 cores, and the
reward is exactly checkable. Example (3 digits)::

    prompt   345+678=
    response 5+8+0=13;4+7+1=12;3+6+1=10;#1023      (then EOS)

Each step is ``digit_a+digit_b+carry_in=sum;`` from the least significant digit; ``#`` marks the final
answer, which the scorer compares with the ground truth. Train and held-out splits are drawn without
replacement from the set of ordered pairs (a, b), so no pair appears in both.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from schemas.data_config import SyntheticTaskConfig

ANSWER_MARK = "#"
#: Every character a prompt or response of this task can contain (the tiny tokenizer's alphabet).
SYMBOLS: tuple[str, ...] = tuple("0123456789") + ("+", "=", ";", ANSWER_MARK)
_STEP = r"\d\+\d\+[01]=\d{1,2};"
_FORMAT = re.compile(rf"(?:{_STEP})+{re.escape(ANSWER_MARK)}\d+")


def operand_range(digits: int) -> tuple[int, int]:
    """Smallest and largest operand with ``digits`` digits (no leading zeros; 1 digit allows 0)."""
    lo = 10 ** (digits - 1) if digits > 1 else 0
    return lo, 10**digits - 1


def make_prompt(a: int, b: int) -> str:
    """The prompt text, e.g. ``345+678=``."""
    return f"{a}+{b}="


def make_response(a: int, b: int, digits: int) -> str:
    """The reference response: the carry chain over ``digits`` positions, then ``#`` and the sum."""
    steps, carry = [], 0
    for i in range(digits):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        s = da + db + carry
        steps.append(f"{da}+{db}+{carry}={s};")
        carry = s // 10
    return "".join(steps) + f"{ANSWER_MARK}{a + b}"


def max_response_chars(digits: int) -> int:
    """Upper bound on the response length in characters (for generation budgets)."""
    return digits * len("9+9+1=19;") + len(ANSWER_MARK) + digits + 1


@lru_cache(maxsize=8)
def _split_pairs(cfg: SyntheticTaskConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) arrays of shape [n, 2] of operand pairs, disjoint, from ``cfg.seed``."""
    lo, hi = operand_range(cfg.digits)
    width = hi - lo + 1
    rng = np.random.default_rng(cfg.seed)
    flat = rng.choice(width * width, size=cfg.n_train + cfg.n_eval, replace=False)
    pairs = np.stack([lo + flat // width, lo + flat % width], axis=1)
    return pairs[cfg.n_eval :], pairs[: cfg.n_eval]


def split_pairs(cfg: SyntheticTaskConfig, split: str) -> np.ndarray:
    """Operand pairs of ``split`` ('train' or 'eval') as an int array [n, 2] (read-only view)."""
    train, held_out = _split_pairs(cfg)
    if split == "train":
        return train
    if split == "eval":
        return held_out
    raise ValueError(f"unknown split {split!r}: use 'train' or 'eval'")


def make_rows(cfg: SyntheticTaskConfig, split: str) -> list[dict]:
    """Rows ``{prompt, ground_truth, data_source, id}`` of one split, in generation order."""
    pairs = split_pairs(cfg, split).tolist()
    return [
        {
            "prompt": make_prompt(a, b),
            "ground_truth": str(a + b),
            "data_source": cfg.data_source,
            "id": f"{cfg.data_source}-{split}-{i}",
        }
        for i, (a, b) in enumerate(pairs)
    ]


def make_sft_texts(cfg: SyntheticTaskConfig, split: str = "train") -> tuple[list[str], list[str]]:
    """(prompts, reference responses) of a split, for the supervised warm start."""
    pairs = split_pairs(cfg, split).tolist()
    return [make_prompt(a, b) for a, b in pairs], [make_response(a, b, cfg.digits) for a, b in pairs]


def extract_answer(response: str) -> str | None:
    """The text after the last answer mark (stripped, EOS text removed), or None if there is no mark."""
    i = response.rfind(ANSWER_MARK)
    if i < 0:
        return None
    ans = response[i + 1 :].strip()
    if ans.endswith("</s>"):
        ans = ans[: -len("</s>")].rstrip()
    return ans


def score_response(response: str, ground_truth: str) -> tuple[float, str | None]:
    """Score one response: ``(1.0, None)`` if the marked answer equals ``ground_truth``, else ``(0.0, reason)``.

    Pure and cheap: safe to call from any process. Only the final answer counts, not the chain.
    """
    ans = extract_answer(response)
    if ans is None:
        return 0.0, "no marked answer"
    if not ans:
        return 0.0, "empty answer"
    if ans == str(ground_truth).strip():
        return 1.0, None
    if not ans.isdigit():
        return 0.0, f"malformed answer {ans[:20]!r}"
    return 0.0, f"wrong answer {ans}"


def format_ok(response: str, digits: int | None = None) -> bool:
    """Whether ``response`` has the chain-then-answer shape (``digits`` steps when given); not correctness."""
    text = response.strip()
    if text.endswith("</s>"):
        text = text[: -len("</s>")]
    if _FORMAT.fullmatch(text) is None:
        return False
    return digits is None or text.count(";") == digits
