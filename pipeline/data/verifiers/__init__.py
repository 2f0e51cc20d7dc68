"""Reward verifiers: the plug-in API (``Score``, ``Verifier``, ``register_verifier``, ``load_verifier``),
reward functions written for verl or TRL (``functions``), the built-ins (``math``, ``exact``, ``numeric``, ``arithmetic``, ``countdown``, ``code``, ``format``;
imported on first lookup) and the worker-process isolation the verifier actor runs them in
(``isolation.IsolatedScorer``).
"""

from pipeline.data.verifiers.base import (
    InfoScore,
    Score,
    Verifier,
    VerifierLoadError,
    load_verifier,
    register_verifier,
    registered_verifiers,
    resolve_verifier_class,
)

__all__ = [
    "InfoScore",
    "Score",
    "Verifier",
    "VerifierLoadError",
    "load_verifier",
    "register_verifier",
    "registered_verifiers",
    "resolve_verifier_class",
]
