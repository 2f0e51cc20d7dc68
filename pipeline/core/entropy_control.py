"""Target-entropy control for Clip-Cov / KL-Cov: a PI controller on the selection knob.

Fixed selection ratios (Clip-Cov r, KL-Cov k) are tuned per model, and users still see entropy
collapse or surge (Cui et al. 2025; users of the reference code reported both on Qwen3 bases). Here the
user asks for an entropy and the controller moves the knob each step to hold it.

Loop, once per RL step t (see docs/entropy_control.md for the driver contract)::

    learner step t runs with knob v_t  ->  reports entropy/mean H_t (policy before step t's update)
    v_{t+1} = controller.update(t, H_t).value

Law (Cui et al.'s entropy lemma, natural PG): ``dH ~ -eta * Cov(log pi, A)``. The high-covariance
tokens drive the drop; detaching (Clip-Cov) or penalising (KL-Cov) more of them -- a higher ratio,
or a higher KL-Cov beta -- removes more of the drop. So: entropy below target -> raise the knob.

Controller (all in log-space: knob ``u = ln v``, error ``e = ln(target / H_smoothed)``)::

    I_t = clamp(I_{t-1} + ki * e_t, +-integral_limit)     (conditional integration, below)
    u_t = ln(v_initial) + kp * e_t + I_t,   v = exp(clamp(u_t, ln min_value, ln max_value))

Anti-windup (conditional integration): an error pushing further into a bound the output already
sits at is not integrated, and an integration step stops where the output reaches the bound; the
integral is also clamped to ``integral_limit``. So after a long saturation (target unreachable), the
knob leaves the bound as soon as the error changes sign.

Surge: raw entropy > ``surge_factor * target`` after having been at or below that line (an upward
crossing, not the initial descent from a high start) -> the knob jumps to ``min_value`` (the value
that keeps the least entropy), the integral is reset to hold it there, the EMA is reset to the raw
entropy, and the output is flagged with a warning.

Pure Python / numpy (no torch, no ray): the driver runs it. Its tests drive it on a tiny synthetic
softmax policy with fast entropy dynamics (tests/toy_bandit.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from schemas.config import PolicyLossConfig, kl_cov_is_noop
from schemas.config import policy_loss as make_policy_loss
from schemas.control_config import EntropyControlConfig

SATURATION_WARN_STEPS = 10  # warn once per episode when the knob sits at a bound this many steps
_EPS = 1e-12  # entropy floor inside the log error
_STATE_VERSION = 1


def apply_overrides(policy_loss: PolicyLossConfig, overrides: dict[str, float]) -> PolicyLossConfig:
    """A validated copy of ``policy_loss`` with ``overrides`` (e.g. ``{"clip_cov_ratio": 3e-4}``).

    For the learner: ``model_copy(update=...)`` would skip validation; this re-validates."""
    return make_policy_loss(**(policy_loss.model_dump() | dict(overrides)))


@dataclass(frozen=True)
class ControlOutput:
    """One controller step. ``value`` is the knob for the *next* learner step."""

    value: float  # knob for the next step, within [min_value, max_value]
    target: float  # target entropy at this step, nats
    error: float  # target - smoothed entropy, nats (> 0: entropy too low -> knob goes up)
    integral: float  # integral term, log-knob units (after anti-windup)
    saturated: bool  # the knob sits at min_value or max_value
    surge: bool  # entropy surge handled this step (knob forced to min_value)
    warning: str | None  # human-readable; several joined by '; '
    log_error: float = 0.0  # ln(target / smoothed entropy): what the PI acts on
    entropy_smoothed: float = 0.0  # EMA of the measured entropy, nats

    def metrics(self) -> dict[str, float]:
        """The ``control/*`` scalars to log (booleans as 0/1)."""
        return {
            "control/value": self.value,
            "control/target": self.target,
            "control/error": self.error,
            "control/integral": self.integral,
            "control/saturated": float(self.saturated),
            "control/surge": float(self.surge),
            "control/log_error": self.log_error,
            "control/entropy_smoothed": self.entropy_smoothed,
        }


class EntropyController:
    """PI controller holding the mean token entropy at a target by moving Clip-Cov's / KL-Cov's knob.

    ``method`` is the policy loss ('clip_cov' or 'kl_cov'); ``initial_value`` the knob's configured
    value (e.g. ``policy_loss.clip_cov_ratio``), used at step 1 and as the PI's operating point
    (clamped into the bounds, with a warning). ``mini_batches`` / ``epochs`` (the learner's) let the
    first update warn when KL-Cov is a no-op. ``update`` must be called with increasing steps.
    """

    def __init__(
        self,
        cfg: EntropyControlConfig,
        method: Literal["clip_cov", "kl_cov"] | str,
        initial_value: float,
        *,
        mini_batches: int | None = None,
        epochs: int = 1,
    ) -> None:
        self.cfg = cfg
        self.method = method
        self.field = cfg.knob_field(method)  # ValueError on ppo / beta with clip_cov
        if not (math.isfinite(initial_value) and initial_value > 0):
            raise ValueError(f"initial_value must be finite and > 0 (log-space control), got {initial_value}")
        lo, hi = cfg.bounds
        self._lo, self._hi = lo, hi
        self._log_lo, self._log_hi = math.log(lo), math.log(hi)
        pending: list[str] = []
        v0 = min(max(float(initial_value), lo), hi)
        if v0 != initial_value:
            pending.append(
                f"entropy_control: initial {self.field}={initial_value:g} is outside [{lo:g}, {hi:g}]; "
                f"starting from {v0:g}"
            )
        if method == "kl_cov" and mini_batches is not None:
            noop = kl_cov_is_noop(mini_batches, epochs)
            if noop:
                pending.append(noop)
        self._u0 = math.log(v0)
        self._pending = pending  # emitted by the first update
        self._step: int | None = None
        self._initial_entropy: float | None = None
        self._smoothed: float | None = None
        self._integral = 0.0
        self._value = v0
        self._armed = False  # surge detection armed once entropy was at/below the surge line
        self._sat_run = 0  # consecutive saturated steps
        self._sat_warned = False

    # ------------------------------------------------------------------------------- queries
    @property
    def value(self) -> float:
        """The knob the next learner step should use (the initial value before any update)."""
        return self._value

    @property
    def initial_entropy(self) -> float | None:
        """Entropy passed to the first update (the reference of ``target_fraction``)."""
        return self._initial_entropy

    def overrides(self) -> dict[str, float]:
        """``{policy-loss field: value}`` for the next learner step, e.g. ``{"kl_cov_ratio": 0.004}``."""
        return {self.field: self._value}

    def target_at(self, step: int) -> float:
        """Target entropy (nats) at ``step``: the schedule interpolated linearly, held at its ends."""
        cfg = self.cfg
        base = cfg.target if cfg.mode == "absolute" else cfg.target_fraction
        assert base is not None, "EntropyControlConfig has no target (enabled=False?)"
        if cfg.schedule:
            xs = [1.0] + [float(s) for s, _ in cfg.schedule]
            ys = [base] + [float(v) for _, v in cfg.schedule]
            base = float(np.interp(float(step), xs, ys))
        if cfg.mode == "absolute":
            return base
        if self._initial_entropy is None:
            raise ValueError("target_fraction needs the initial entropy: call update() first")
        return base * self._initial_entropy

    # -------------------------------------------------------------------------------- update
    def update(self, step: int, entropy: float) -> ControlOutput:
        """Feed the mean entropy reported by learner step ``step``; returns the knob for step + 1."""
        if self._step is not None and step <= self._step:
            raise ValueError(f"update steps must increase: got {step} after {self._step}")
        self._step = step
        warnings, self._pending = self._pending, []
        entropy = float(entropy)
        if not (math.isfinite(entropy) and entropy >= 0):
            warnings.append(
                f"entropy_control: entropy/mean={entropy} at step {step} is not usable; knob held"
            )
            target = (
                self.target_at(step)
                if self._initial_entropy is not None or self.cfg.mode == "absolute"
                else math.nan
            )
            return ControlOutput(
                value=self._value,
                target=target,
                error=math.nan,
                integral=self._integral,
                saturated=self._is_saturated(math.log(self._value)),
                surge=False,
                warning="; ".join(warnings) or None,
                log_error=math.nan,
                entropy_smoothed=math.nan if self._smoothed is None else self._smoothed,
            )
        if self._initial_entropy is None:
            self._initial_entropy = entropy
        cfg = self.cfg
        target = self.target_at(step)
        a = cfg.smoothing
        self._smoothed = entropy if self._smoothed is None else a * self._smoothed + (1 - a) * entropy

        surge = False
        if cfg.surge_factor is not None:
            line = cfg.surge_factor * target
            if entropy <= line:
                self._armed = True
            elif self._armed:
                surge = True

        if surge:
            self._smoothed = entropy  # react to the raw value, not a lagging average
            e = math.log(target / max(self._smoothed, _EPS))
            self._integral = self._clamp_integral(self._log_lo - self._u0)
            u = self._log_lo
            warnings.append(
                f"entropy_control: entropy surge at step {step}: entropy {entropy:.4g} > "
                f"{cfg.surge_factor:g} x target {target:.4g}; {self.field} -> min_value {self._lo:g}"
            )
        else:
            e = math.log(target / max(self._smoothed, _EPS))
            self._integral = self._integrate(e)
            u = self._u0 + cfg.kp * e + self._integral
        # exact bounds when clamped (exp(log(x)) can be off by an ulp)
        self._value = self._lo if u <= self._log_lo else self._hi if u >= self._log_hi else math.exp(u)
        saturated = self._is_saturated(u)

        if saturated and not surge:
            self._sat_run += 1
            if self._sat_run >= SATURATION_WARN_STEPS and not self._sat_warned:
                self._sat_warned = True
                side = "max_value" if u >= self._log_hi else "min_value"
                warnings.append(
                    f"entropy_control: {self.field} has sat at {side}={self._value:g} for {self._sat_run} steps "
                    f"(entropy {self._smoothed:.4g}, target {target:.4g}): the target may be unreachable "
                    "within the bounds; widen them or change the target"
                )
        else:
            self._sat_run, self._sat_warned = 0, False

        return ControlOutput(
            value=self._value,
            target=target,
            error=target - self._smoothed,
            integral=self._integral,
            saturated=saturated,
            surge=surge,
            warning="; ".join(warnings) or None,
            log_error=e,
            entropy_smoothed=self._smoothed,
        )

    def _is_saturated(self, u: float) -> bool:
        tol = 1e-9
        return u >= self._log_hi - tol or u <= self._log_lo + tol

    def _clamp_integral(self, i: float) -> float:
        lim = self.cfg.integral_limit
        return i if lim is None else min(max(i, -lim), lim)

    def _integrate(self, e: float) -> float:
        cfg = self.cfg
        i_old = self._integral
        i_new = i_old + cfg.ki * e
        if cfg.anti_windup:
            p = self._u0 + cfg.kp * e  # output without the integral
            if e > 0:  # pushing up: integrate at most until the output reaches max_value, never undo
                i_new = min(i_new, max(i_old, self._log_hi - p))
            elif e < 0:
                i_new = max(i_new, min(i_old, self._log_lo - p))
        return self._clamp_integral(i_new)

    # ----------------------------------------------------------------------------- resumption
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; ``load_state_dict`` on a fresh controller resumes exactly."""
        return {
            "version": _STATE_VERSION,
            "method": self.method,
            "field": self.field,
            "u0": self._u0,
            "step": self._step,
            "initial_entropy": self._initial_entropy,
            "smoothed": self._smoothed,
            "integral": self._integral,
            "value": self._value,
            "armed": self._armed,
            "sat_run": self._sat_run,
            "sat_warned": self._sat_warned,
            "pending": list(self._pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the config must drive the same field)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"entropy controller state version {state.get('version')} != {_STATE_VERSION}")
        if state["field"] != self.field:
            raise ValueError(
                f"checkpointed controller drove {state['field']!r}, this run drives {self.field!r}"
            )
        self._u0 = float(state["u0"])
        self._step = None if state["step"] is None else int(state["step"])
        self._initial_entropy = None if state["initial_entropy"] is None else float(state["initial_entropy"])
        self._smoothed = None if state["smoothed"] is None else float(state["smoothed"])
        self._integral = float(state["integral"])
        self._value = float(state["value"])
        self._armed = bool(state["armed"])
        self._sat_run = int(state["sat_run"])
        self._sat_warned = bool(state["sat_warned"])
        self._pending = list(state["pending"])


__all__ = [
    "ControlOutput",
    "EntropyController",
    "SATURATION_WARN_STEPS",
    "apply_overrides",
]
