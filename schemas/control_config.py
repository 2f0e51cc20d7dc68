"""Target-entropy controller configuration (``algorithm.entropy_control`` in a run config).

The controller (``pipeline.core.entropy_control.EntropyController``) turns the fixed selection knob of
Clip-Cov / KL-Cov (the ratio r / k, or KL-Cov's beta) into a feedback loop: the user asks for an
entropy -- absolute nats or a fraction of the entropy measured at step 1, optionally on a schedule --
and a PI controller in log-space of the knob holds it. Why log-space: useful ratios span orders of
magnitude (2e-4 for Clip-Cov on 7B, 2e-3 for KL-Cov), so the controller moves the knob by factors.

Units: the controller's error is ``ln(target / smoothed_entropy)`` (dimensionless, symmetric in
"too high" vs "too low"), the knob is ``ln(value)``; ``kp`` and ``ki`` multiply the one to give the
other. ``integral`` is kept in log-knob units (``ki`` already applied), so ``integral_limit`` is the
largest factor ``exp(limit)`` the integral term alone may move the knob away from its initial value.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from schemas.config import Strict

# Bounds used when min_value / max_value are left unset (per knob).
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {"ratio": (1e-5, 0.1), "beta": (0.01, 100.0)}
KNOB_FIELDS: dict[tuple[str, str], str] = {
    ("clip_cov", "ratio"): "clip_cov_ratio",
    ("kl_cov", "ratio"): "kl_cov_ratio",
    ("kl_cov", "beta"): "kl_cov_beta",
}


class EntropyControlConfig(Strict):
    """PI control of the mean token entropy through Clip-Cov's / KL-Cov's knob.

    Direction: a higher ratio (more tokens detached / penalised) or a higher beta removes more of
    the entropy-lowering update, so entropy stays higher; below target -> the knob goes up.
    """

    enabled: bool = Field(
        False, description="Run the controller. Off: the knob stays at its configured value."
    )
    target: float | None = Field(
        None,
        gt=0,
        description="Target mean token entropy in nats (absolute mode). Exactly one of target / "
        "target_fraction when enabled. With a schedule it is the target at step 1.",
    )
    target_fraction: float | None = Field(
        None,
        gt=0,
        description="Target as a fraction of the initial entropy (the entropy/mean reported at the first "
        "controlled step, normally step 1), e.g. 0.6. Exactly one of target / target_fraction when enabled. "
        "With a schedule it is the target at step 1.",
    )
    schedule: list[tuple[int, float]] | None = Field(
        None,
        description="Optional [[step, value], ...] points (steps > 1, strictly increasing; values in the "
        "unit of the mode: nats for target, fraction for target_fraction). The target is linearly "
        "interpolated from (1, target or target_fraction) through the points and held after the last one.",
    )
    knob: Literal["ratio", "beta"] = Field(
        "ratio",
        description="'ratio' drives clip_cov_ratio (clip_cov) or kl_cov_ratio (kl_cov); 'beta' drives "
        "kl_cov_beta (kl_cov only).",
    )
    kp: float = Field(
        5.0, ge=0, description="Proportional gain: log-knob change per unit log-entropy error ln(target/H)."
    )
    ki: float = Field(
        0.2, ge=0, description="Integral gain: log-knob added to the integral per step per unit log error."
    )
    min_value: float | None = Field(
        None,
        gt=0,
        description="Lower bound of the knob (None: 1e-5 for ratio, 0.01 for beta). Must be > 0 (log-space).",
    )
    max_value: float | None = Field(
        None,
        gt=0,
        description="Upper bound of the knob (None: 0.1 for ratio, 100 for beta). Ratios must stay <= 1.",
    )
    integral_limit: float | None = Field(
        math.log(1e3),
        gt=0,
        description="Anti-windup clamp: |integral| <= this, in log-knob units (ln 1000 ~ 6.9: the integral "
        "alone moves the knob at most 1000x). None: unclamped.",
    )
    anti_windup: bool = Field(
        True,
        description="Conditional integration: while the knob is saturated at a bound, do not integrate "
        "errors that push further into it. Turn off only to diagnose (windup makes recovery slow).",
    )
    surge_factor: float | None = Field(
        2.0,
        gt=1,
        description="Surge when the raw entropy exceeds surge_factor * target after having been at or below "
        "it: the knob jumps to min_value (lowest entropy-keeping), the integral is reset to match, and "
        "the output is flagged. None disables surge handling.",
    )
    smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="EMA weight of the previous smoothed entropy (0 = no smoothing; 0.5 ~ 2-step memory). "
        "The controller acts on the smoothed entropy; surge detection uses the raw one.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> EntropyControlConfig:
        if self.target is not None and self.target_fraction is not None:
            raise ValueError("set only one of entropy_control.target (nats) and target_fraction (of initial)")
        if self.enabled and self.target is None and self.target_fraction is None:
            raise ValueError(
                "entropy_control.enabled needs a target: set target (nats) or target_fraction (of initial)"
            )
        lo, hi = self.bounds
        if lo >= hi:
            raise ValueError(f"entropy_control.min_value ({lo}) must be < max_value ({hi})")
        if self.knob == "ratio" and hi > 1:
            raise ValueError(f"entropy_control.max_value={hi}: a selection ratio is a fraction, <= 1")
        if self.schedule:
            steps = [s for s, _ in self.schedule]
            if steps[0] <= 1 or any(b <= a for a, b in zip(steps, steps[1:])):
                raise ValueError(
                    "entropy_control.schedule steps must be > 1 and strictly increasing (step 1's target "
                    f"is target / target_fraction), got {steps}"
                )
            if any(not (v > 0 and math.isfinite(v)) for _, v in self.schedule):
                raise ValueError("entropy_control.schedule values must be finite and > 0")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        """``(min_value, max_value)`` with the per-knob defaults filled in."""
        lo, hi = DEFAULT_BOUNDS[self.knob]
        return (
            lo if self.min_value is None else self.min_value,
            hi if self.max_value is None else self.max_value,
        )

    @property
    def mode(self) -> Literal["absolute", "fraction"]:
        """'fraction' when target_fraction is set, else 'absolute'."""
        return "fraction" if self.target_fraction is not None else "absolute"

    def knob_field(self, method: str) -> str:
        """The ``PolicyLossConfig`` field this controller drives for policy loss ``method``.

        Raises ValueError for combinations that cannot work (ppo has no knob; beta needs kl_cov), so a
        run config validator can call it with ``algorithm.policy_loss.name``.
        """
        key = (method, self.knob)
        if key not in KNOB_FIELDS:
            if method not in ("clip_cov", "kl_cov"):
                raise ValueError(
                    f"entropy_control needs policy_loss.name 'clip_cov' or 'kl_cov' (got {method!r}): "
                    "only they have a selection knob"
                )
            raise ValueError("entropy_control.knob='beta' is only valid with kl_cov (Clip-Cov has no beta)")
        return KNOB_FIELDS[key]
