"""The entropy-performance law ``R = -a * exp(H) + b`` (Cui et al. 2025).

R is validation accuracy, H the mean token entropy of the training batches at the same steps.
The model is linear in (a, b) given ``x = exp(H)``, so the least-squares fit is closed form
(``numpy.linalg.lstsq`` on ``[-x, 1]``). The predicted ceiling, reached when entropy collapses to
H = 0, is ``-a + b``. The paper fits on the first ~15% of steps and predicts the rest to ~1% RMSE;
:func:`fit_early` reproduces that check.

Deviations: none (the paper does not say how it fits; ordinary least squares in R is assumed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LawFit:
    """Fitted ``R = -a * exp(H) + b`` on ``n`` points; ``r2`` is the coefficient of determination,
    ``ceiling = -a + b`` the predicted R at H = 0 (full entropy collapse)."""

    a: float
    b: float
    r2: float
    ceiling: float
    n: int

    def predict(self, entropy) -> np.ndarray:
        """R predicted at entropies ``entropy`` (scalar or array)."""
        return -self.a * np.exp(np.asarray(entropy, dtype=np.float64)) + self.b


def fit_law(entropy, reward) -> LawFit:
    """Least-squares fit of ``R = -a exp(H) + b``.

    Args:
        entropy: (n,) mean token entropies H.
        reward: (n,) validation accuracies R at the same steps.

    Raises:
        ValueError: fewer than 2 points, mismatched lengths, non-finite values, or constant H
        (a and b are then not identifiable: log more steps before fitting).
    """
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    if h.shape != r.shape:
        raise ValueError(f"entropy and reward need the same length, got {h.size} and {r.size}")
    if h.size < 2:
        raise ValueError(f"need at least 2 (entropy, reward) points to fit a and b, got {h.size}")
    if not (np.isfinite(h).all() and np.isfinite(r).all()):
        raise ValueError("entropy and reward must be finite (drop NaN/inf steps before fitting)")
    x = np.exp(h)
    if np.ptp(x) <= 1e-12 * max(1.0, np.abs(x).max()):
        raise ValueError("entropy is constant across points: a and b cannot be separated; fit on more steps")
    design = np.stack([-x, np.ones_like(x)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    resid = r - design @ np.array([a, b])
    ss_tot = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return LawFit(a=float(a), b=float(b), r2=r2, ceiling=float(b - a), n=int(h.size))


@dataclass(frozen=True)
class EarlyFit:
    """Fit on the first ``n_fit`` points; ``predictions`` and ``rmse`` are on the remaining ones."""

    fit: LawFit
    n_fit: int
    predictions: np.ndarray
    rmse: float


def fit_early(entropy, reward, fraction: float = 0.15) -> EarlyFit:
    """Fit on the first ``fraction`` of the points (in order) and predict the rest.

    The number of fitting points is ``max(2, round(fraction * n))``; at least one point must be
    left to predict. Raises ValueError otherwise or as :func:`fit_law` does.
    """
    h = np.asarray(entropy, dtype=np.float64).reshape(-1)
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if h.shape != r.shape:
        raise ValueError(f"entropy and reward need the same length, got {h.size} and {r.size}")
    n_fit = max(2, int(round(fraction * h.size)))
    if n_fit >= h.size:
        raise ValueError(f"{h.size} points leave none to predict after fitting on {n_fit}; log more steps")
    fit = fit_law(h[:n_fit], r[:n_fit])
    pred = fit.predict(h[n_fit:])
    rmse = float(np.sqrt(np.mean((pred - r[n_fit:]) ** 2)))
    return EarlyFit(fit=fit, n_fit=n_fit, predictions=pred, rmse=rmse)


def law_at(row: dict, entropy: float | None) -> float | None:
    """The fitted ``R = -a exp(H) + b`` of ``row`` at ``entropy`` (None without a fit or an entropy)."""
    if entropy is None or "law/a" not in row or "law/b" not in row:
        return None
    return -row["law/a"] * math.exp(entropy) + row["law/b"]
