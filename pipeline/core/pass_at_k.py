"""Unbiased pass@k from n samples per problem (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", eq. 1): ``pass@k = E_problems[1 - C(n - c, k) / C(n, k)]`` with ``c`` correct of ``n`` samples.

Why not "any of the first k correct": that uses k of the n samples and throws the rest away; the unbiased
estimator averages over every k-subset of the n samples, so pass@1 is the plain mean accuracy and pass@k
for k < n has far less variance. The product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` avoids huge
binomials.
"""

from __future__ import annotations

import numpy as np

#: The k the held-out evaluation reports, where ``schedule.eval_samples`` (n) allows (k <= n), plus n itself.
REPORTED_K = (1, 4, 16, 64, 256)


def pass_at_k(correct: np.ndarray, k: int) -> float:
    """Mean unbiased pass@k over problems; ``correct`` is a bool array [problems, n] with n >= k."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2:
        raise ValueError(f"correct must be [problems, samples], got shape {correct.shape}")
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples per problem (n = {n})")
    if correct.shape[0] == 0:
        return 0.0
    c = correct.sum(axis=1)
    i = np.arange(1, n + 1, dtype=np.float64)
    fail = np.zeros(len(c))  # C(n-c, k)/C(n, k); 0 when n - c < k (every k-subset holds a correct one)
    for value in np.unique(c[n - c >= k]):
        fail[c == value] = np.prod(1.0 - k / i[n - value :])
    return float(np.mean(1.0 - fail))


def pass_at_k_metrics(correct: np.ndarray, prefix: str = "eval/") -> dict[str, float]:
    """``{prefix}pass@k`` for every k in ``REPORTED_K`` that n samples allow, and for k = n."""
    n = np.asarray(correct).shape[1]
    ks = sorted({k for k in REPORTED_K if k <= n} | {n})
    return {f"{prefix}pass@{k}": pass_at_k(correct, k) for k in ks}
