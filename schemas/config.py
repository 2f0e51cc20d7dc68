"""Config building blocks shared by every section: ``Strict`` (unknown keys rejected, frozen),
``Resources`` (what one replica asks Ray for) and the policy-loss configs (one model per registered
loss, selected by ``name``).
The whole run config assembles them in ``schemas/run_config.py``.

Why Pydantic and frozen: a config is parsed once at start-up (YAML + ``--set`` overrides), errors name
the full dotted field path, and nothing downstream can mutate it behind the driver's back.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, model_validator


class Strict(BaseModel):
    # allow_inf_nan=False: an infinite learning rate or timeout is never meant, and NaN slips through every
    # range check (all comparisons are false), so every float field must be a finite number.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class Resources(Strict):
    """What one replica of a role asks Ray for. Custom resources pin roles to labelled nodes."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (fractional allowed).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica.")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. {'gen_node': 0.1}, to pin to nodes."
    )


AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


class PolicyLossBase(Strict):
    """What every policy loss has: its registered ``name`` and how its per-token terms are aggregated.
    Each loss has its own config with only its fields (``algorithm.policy_loss.name`` selects it), so a
    field of another loss is refused at load, naming it."""

    name: str
    loss_agg_mode: AggMode = Field(
        "token-mean", description="Aggregation of per-token terms (pipeline/core/aggregation.py)."
    )
    seq_norm_length: int | None = Field(
        None, gt=0, description="seq-mean-token-sum-norm divisor (Dr.GRPO: max response length)."
    )


class _ClippedSurrogate(PolicyLossBase):
    clip_ratio_low: float = Field(0.2, ge=0, description="PPO eps_low: ratio clipped below at 1-eps_low.")
    clip_ratio_high: float = Field(0.2, ge=0, description="PPO eps_high (clip-higher: 0.28).")
    clip_ratio_c: float | None = Field(
        None, gt=1, description="Dual-clip bound for negative advantages (e.g. 3.0); None disables."
    )


class PPOLossConfig(_ClippedSurrogate):
    """``ppo``: the clipped surrogate, with clip-higher (``clip_ratio_high``) and optional dual clip."""

    name: Literal["ppo"] = "ppo"


class ClipCovLossConfig(_ClippedSurrogate):
    """``clip_cov``: the PPO surrogate with a random fraction of the tokens whose covariance lies in the band
    (and whose gradient the PPO clip has not already zeroed) detached (Cui et al. 2025). Ratios are plain
    fractions (2e-4 means 0.02%)."""

    name: Literal["clip_cov"] = "clip_cov"
    clip_cov_ratio: float = Field(2e-4, gt=0, le=1, description="Fraction r of valid tokens to detach.")
    clip_cov_lb: float = Field(1.0, description="Lower covariance bound of the candidate band.")
    clip_cov_ub: float = Field(5.0, description="Upper covariance bound of the candidate band.")

    @model_validator(mode="after")
    def _band(self) -> ClipCovLossConfig:
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError("clip_cov_lb must be < clip_cov_ub (the candidate band is lb < cov < ub)")
        return self


class KLCovLossConfig(PolicyLossBase):
    """``kl_cov``: the unclipped ``-A r`` on every token plus ``beta |logp - old_logp|`` on the top-k fraction
    by covariance (Cui et al. 2025). No PPO clip: it has no clip fields."""

    name: Literal["kl_cov"] = "kl_cov"
    kl_cov_ratio: float = Field(2e-3, gt=0, le=1, description="Fraction k of valid tokens penalised.")
    kl_cov_beta: float = Field(1.0, ge=0, description="Penalty coefficient (paper: 1; verl default 0.1).")


def kl_cov_is_noop(mini_batches: int, epochs: int) -> str | None:
    """A warning when KL-Cov cannot act: with one optimizer update per rollout batch the policy is
    on-policy at every update (logp == old_logp), so ``beta * |logp - old_logp|`` is 0 with 0 gradient.
    None when there are several updates per rollout batch."""
    if mini_batches < 1 or epochs < 1:
        raise ValueError(f"mini_batches and epochs must be >= 1, got {mini_batches}, {epochs}")
    if mini_batches * epochs > 1:
        return None
    return (
        "kl_cov with one optimizer update per rollout batch (learner.mini_batches=1, learner.epochs=1) is "
        "a no-op: |logp - old_logp| = 0 on-policy, so the penalty and the entropy controller's knob do "
        "nothing; set learner.mini_batches > 1 (the paper uses 8)"
    )


class CustomLossConfig(PolicyLossBase):
    """A policy loss of your own, named by import path ``package.module:function`` (the function has the
    signature of ``pipeline.core.losses``; it receives this config, with your ``options``)."""

    name: str = Field(..., pattern=r"^[\w.]+:[\w]+$", description="Import path 'package.module:function'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Your loss's own settings.")


BUILTIN_LOSSES = {"ppo": PPOLossConfig, "clip_cov": ClipCovLossConfig, "kl_cov": KLCovLossConfig}


def _loss_tag(value: Any) -> str | None:
    name = value.get("name", "ppo") if isinstance(value, dict) else getattr(value, "name", None)
    if not isinstance(name, str):
        return None
    return name if name in BUILTIN_LOSSES else ("custom" if ":" in name else None)


PolicyLossConfig = Annotated[
    Annotated[PPOLossConfig, Tag("ppo")]
    | Annotated[ClipCovLossConfig, Tag("clip_cov")]
    | Annotated[KLCovLossConfig, Tag("kl_cov")]
    | Annotated[CustomLossConfig, Tag("custom")],
    Discriminator(
        _loss_tag,
        custom_error_type="unknown_policy_loss",
        custom_error_message="unknown policy loss name: use 'ppo', 'clip_cov', 'kl_cov' or an import path "
        "'package.module:function'",
    ),
]
_ADAPTER = TypeAdapter(PolicyLossConfig)


def policy_loss(**fields: Any) -> PolicyLossBase:
    """A validated policy-loss config from its fields (``name`` selects which; default ``ppo``)."""
    return _ADAPTER.validate_python(fields)
