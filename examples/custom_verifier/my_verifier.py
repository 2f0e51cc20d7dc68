"""A custom reward verifier in a few lines: the last line of the response must equal the ground truth,
ignoring case, spaces and a trailing period; a short response gets a small bonus.

Select it in a run config by import path (no registration needed)::

    verifier: {default: {name: "examples.custom_verifier.my_verifier:MyVerifier", options: {bonus: 0.1}}}
"""

from pipeline.data.verifiers import Score


class MyVerifier:
    def __init__(self, bonus: float = 0.0, max_chars: int = 200):
        self.bonus, self.max_chars = bonus, max_chars

    def score(self, prompts, responses, ground_truths, extras):
        out = []
        for response, truth in zip(responses, ground_truths):
            lines = response.strip().splitlines() or [""]
            norm = lambda s: "".join(s.split()).rstrip(".").casefold()  # noqa: E731
            if norm(lines[-1]) != norm(truth):
                out.append(Score(0.0, f"last line {lines[-1][:30]!r} != {truth[:30]!r}"))
            else:
                out.append(Score(1.0 + (self.bonus if len(response) <= self.max_chars else 0.0)))
        return out
