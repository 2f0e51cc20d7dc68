"""A verl-style reward function, used by covrl unchanged.

The last number in the response must equal the ground truth; the dict's other keys (``acc``,
``answered``) are logged as ``verifier/<source>/info/<key>/mean``. Select it by import path::

    verifier: {default: {name: "examples.reward_functions.verl_score:compute_score"}}
"""

import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    numbers = re.findall(r"-?\d+(?:\.\d+)?", solution_str)
    if not numbers:
        return {"score": 0.0, "acc": False, "answered": False}
    correct = float(numbers[-1]) == float(ground_truth)
    # verl's extra_info carries the row's extra fields; a row may ask for partial credit.
    partial = float((extra_info or {}).get("partial_credit", 0.0))
    return {"score": 1.0 if correct else partial, "acc": correct, "answered": True}
