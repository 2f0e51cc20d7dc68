"""A TRL-style reward function (``GRPOTrainer(reward_funcs=...)``), used by covrl unchanged.

Batched: one call scores every completion; dataset columns arrive as keyword lists (``ground_truth``,
``data_source`` and each key of the rows' extras, e.g. ``max_chars``). ``None`` means "not scored here"
and scores that sample 0 with the reason. Select it by import path::

    verifier: {default: {name: "examples.reward_functions.trl_reward:last_line_matches"}}
"""


def last_line_matches(prompts, completions, ground_truth, **kwargs):
    max_chars = kwargs.get("max_chars") or [None] * len(completions)
    rewards = []
    for completion, truth, limit in zip(completions, ground_truth, max_chars):
        if limit is not None and len(completion) > limit:
            rewards.append(None)  # over the row's length budget: no reward from this function
            continue
        lines = completion.strip().splitlines() or [""]
        rewards.append(1.0 if lines[-1].strip() == str(truth).strip() else 0.0)
    return rewards
