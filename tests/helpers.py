"""Small helpers shared by tests (not part of covrl)."""

from __future__ import annotations

from typing import Any

from schemas.config import BUILTIN_LOSSES, PolicyLossBase


def loss_cfg(name: str = "ppo", **fields: Any) -> PolicyLossBase:
    """The ``name`` loss's config from settings shared by parametrized tests: fields the loss does not have
    are left out (each loss config refuses other losses' fields)."""
    cls = BUILTIN_LOSSES[name]
    return cls(name=name, **{k: v for k, v in fields.items() if k in cls.model_fields})
