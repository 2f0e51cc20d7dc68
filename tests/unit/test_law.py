"""R = -a exp(H) + b: recovery from noisy data, early-fit prediction, clear errors."""

import numpy as np
import pytest

from pipeline.core.law import fit_early, fit_law


def test_exact_two_points():
    # H = 0 -> R = -a + b = 0.5; H = log 2 -> R = -2a + b = 0.2  =>  a = 0.3, b = 0.8.
    fit = fit_law([0.0, np.log(2.0)], [0.5, 0.2])
    assert fit.a == pytest.approx(0.3) and fit.b == pytest.approx(0.8)
    assert fit.ceiling == pytest.approx(0.5) and fit.n == 2 and fit.r2 == pytest.approx(1.0)
    assert fit.predict(np.log(3.0)) == pytest.approx(-0.9 + 0.8)


def test_recovers_a_b_from_noisy_data():
    rng = np.random.default_rng(0)
    h = np.linspace(1.5, 0.1, 80)  # entropy falling over training
    r = -0.25 * np.exp(h) + 0.95 + rng.normal(0, 0.01, h.size)
    fit = fit_law(h, r)
    assert fit.a == pytest.approx(0.25, abs=0.02)
    assert fit.b == pytest.approx(0.95, abs=0.03)
    assert fit.r2 > 0.95
    assert fit.ceiling == pytest.approx(0.70, abs=0.02)


def test_fit_early_predicts_the_rest():
    # Entropy collapses fast early, as in the paper; fit on the first 15% of 100 steps.
    rng = np.random.default_rng(1)
    steps = np.arange(100)
    h = 0.2 + 1.3 * np.exp(-steps / 15)
    r = -0.25 * np.exp(h) + 0.95 + rng.normal(0, 0.005, h.size)
    early = fit_early(h, r, 0.15)
    assert early.n_fit == 15 and early.predictions.shape == (85,)
    assert early.rmse < 0.02
    # A wrong law (shifted b) would be off by far more than that.
    assert np.sqrt(np.mean((early.predictions + 0.05 - r[15:]) ** 2)) > early.rmse


def test_errors():
    with pytest.raises(ValueError, match="at least 2"):
        fit_law([1.0], [0.5])
    with pytest.raises(ValueError, match="constant"):
        fit_law([0.7, 0.7, 0.7], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        fit_law([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="none to predict"):
        fit_early([0.1, 0.2], [0.3, 0.4], 0.5)
