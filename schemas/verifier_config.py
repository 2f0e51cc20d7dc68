"""Verifier role config: which reward plug-in scores which data source, and how it is isolated.

A plug-in is named by a registered name (``math``, ``exact``, ``numeric``, ``arithmetic``, ``countdown``,
``code``) or an import path ``package.module:ClassName``; its ``options`` are passed to its constructor as
keyword arguments. An import path may also name a verl-style ``compute_score`` or a TRL-style reward
function (``pipeline.data.verifiers.functions``); its options are then extra keyword arguments of each call. Samples are routed by their ``data_source``: ``routes`` first, ``default`` otherwise.
When the run uses a built-in synthetic task, its data_source is routed to the task's verifier unless
``routes`` names it (``pipeline.data.tasks.verifier_config_for_run``); a run on files routes verl's math
data sources (``openai/gsm8k``, ``lighteval/MATH``, ...: ``pipeline.data.known_sources``) to ``math``
the same way. Example YAML::

    verifier:
      replicas: 2
      default: {name: math, options: {boxed_priority: 0}}
      routes:
        gsm8k: {name: numeric, options: {rel_tol: 1.0e-6}}
        apps: {name: code, options: {wall_s: 3}}
      format_reward: {pattern: '\\\\boxed\\{', bonus: 0.0, penalty: 0.1}
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from schemas.config import Resources, Strict


class VerifierSpec(Strict):
    """One reward plug-in: how to find it and how to construct it."""

    name: str = Field(
        ...,
        min_length=1,
        description="Registered verifier name (e.g. 'math') or import path 'package.module:ClassName' (or "
        "'package.module:function' for a verl- or TRL-style reward function).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the verifier's constructor (a reward function's calls).",
    )


class FormatRewardSpec(Strict):
    """A format term added on top of every routed verifier (the answer must be marked, e.g. boxed)."""

    pattern: str = Field(..., min_length=1, description="Regex searched in the response (re.DOTALL).")
    bonus: float = Field(0.0, ge=0, description="Added to the score when the pattern is found.")
    penalty: float = Field(0.0, ge=0, description="Subtracted from the score when the pattern is missing.")
    gate: bool = Field(
        False, description="When True a response without the pattern gets no verifier reward, only -penalty."
    )

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(
                f"format_reward.pattern is not a valid regex ({err}); escape backslashes in YAML"
            ) from err
        return value


class VerifierConfig(Strict):
    """The verifier role: replicas, resources, per-source routing, per-sample timeout and isolation."""

    replicas: int = Field(1, ge=1, description="Verifier actors; a batch is split across them.")
    resources: Resources = Field(
        Resources(num_cpus=0.5), description="What each verifier actor asks Ray for."
    )
    default: VerifierSpec = Field(
        VerifierSpec(name="arithmetic"), description="Verifier for data sources not listed in routes."
    )
    routes: dict[str, VerifierSpec] = Field(
        default_factory=dict, description="data_source -> verifier; sources not listed use 'default'."
    )
    timeout_s: float = Field(
        10.0, gt=0, description="Per-sample wall-clock limit; a sample over it scores 0 (reason 'timeout')."
    )
    workers_per_replica: int = Field(
        1, ge=1, description="Isolated worker processes per actor (plug-ins run there, never in the actor)."
    )
    format_reward: FormatRewardSpec | None = Field(
        None, description="Optional format bonus/penalty composed with every routed verifier."
    )
