"""Config building blocks shared by every section: ``Strict`` (unknown keys rejected, frozen),
``Resources`` (what one replica asks Ray for) and ``PolicyLossConfig`` (the loss registry's config).
The whole run config assembles them in ``schemas/run_config.py``.

Why Pydantic and frozen: a config is parsed once at start-up (YAML + ``--set`` overrides), errors name
the full dotted field path, and nothing downstream can mutate it behind the driver's back.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


class PolicyLossConfig(Strict):
    """Policy-loss choice and parameters. Ratios are plain fractions (2e-4 means 0.02%)."""

    name: str = Field("ppo", description="Registered loss: 'ppo', 'clip_cov' or 'kl_cov'.")
    clip_ratio_low: float = Field(0.2, ge=0, description="PPO eps_low: ratio clipped below at 1-eps_low.")
    clip_ratio_high: float = Field(0.2, ge=0, description="PPO eps_high (clip-higher: 0.28).")
    clip_ratio_c: float | None = Field(
        None, gt=1, description="Dual-clip bound for negative advantages (e.g. 3.0); None disables."
    )
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = "token-mean"
    clip_cov_ratio: float = Field(
        2e-4, gt=0, le=1, description="Clip-Cov: fraction r of valid tokens to detach."
    )
    clip_cov_lb: float = Field(1.0, description="Clip-Cov: lower covariance bound of the candidate band.")
    clip_cov_ub: float = Field(5.0, description="Clip-Cov: upper covariance bound of the candidate band.")
    kl_cov_ratio: float = Field(2e-3, gt=0, le=1, description="KL-Cov: fraction k of valid tokens penalised.")
    kl_cov_beta: float = Field(
        1.0, ge=0, description="KL-Cov: penalty coefficient (paper: 1; verl default 0.1)."
    )
    seq_norm_length: int | None = Field(
        None, gt=0, description="seq-mean-token-sum-norm divisor (Dr.GRPO: max response length)."
    )

    @model_validator(mode="after")
    def _band(self) -> PolicyLossConfig:
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError("clip_cov_lb must be < clip_cov_ub (the candidate band is lb < cov < ub)")
        return self
