"""The unbiased pass@k estimator, against brute force over every k-subset of the samples."""

import itertools

import numpy as np
import pytest

from pipeline.core.pass_at_k import pass_at_k, pass_at_k_metrics


def brute_force(correct: np.ndarray, k: int) -> float:
    """Mean over problems of the fraction of k-subsets of the n samples that hold a correct one."""
    n = correct.shape[1]
    per_problem = [
        np.mean([row[list(sub)].any() for sub in itertools.combinations(range(n), k)]) for row in correct
    ]
    return float(np.mean(per_problem))


@pytest.mark.parametrize("n", [1, 3, 6, 8])
def test_matches_every_subset(n):
    rng = np.random.default_rng(n)
    correct = rng.random((9, n)) < 0.35
    correct[0] = False  # a problem never solved
    correct[1] = True  # one always solved
    for k in range(1, n + 1):
        assert pass_at_k(correct, k) == pytest.approx(brute_force(correct, k), abs=1e-12)


def test_hand_values_and_edges():
    # one problem, 4 samples, 1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; pass@4 = 1
    c = np.array([[True, False, False, False]])
    assert [pass_at_k(c, k) for k in (1, 2, 4)] == pytest.approx([0.25, 0.5, 1.0])
    assert pass_at_k(np.zeros((2, 64), bool), 64) == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(c, 5)
    with pytest.raises(ValueError, match="samples"):
        pass_at_k(np.array([True]), 1)


def test_metrics_report_powers_of_four_up_to_n_and_n():
    c = np.random.default_rng(0).random((5, 20)) < 0.2
    m = pass_at_k_metrics(c)
    assert list(m) == ["eval/pass@1", "eval/pass@4", "eval/pass@16", "eval/pass@20"]
    assert m["eval/pass@1"] == pytest.approx(c.mean())
    vals = list(m.values())
    assert vals == sorted(vals)  # pass@k never falls as k grows
