"""Load a RunConfig from YAML plus dotted ``--set`` overrides, with errors that name the field path.

``--set algorithm.policy_loss.name=kl_cov`` parses the value as a YAML scalar (so ``1e-4`` is a float,
``true`` a bool, ``[1, 2]`` a list, ``null`` None). Unknown keys and bad values are reported as
``algorithm.policy_loss.clip_cov_ub: Input should be a valid number (got 'abc')``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from schemas.run_config import RunConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the field and the reason."""


# Sections that are a choice between models keyed by a tag (``policy_loss.name``, ``synthetic.task``):
# Pydantic puts the chosen tag into an error's location; it is shown as the choice, not as a key.
TAGGED_SECTIONS = ("policy_loss", "synthetic")


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc, choice = list(e["loc"]), None
        for i, part in enumerate(loc[:-1]):
            if part in TAGGED_SECTIONS and i + 2 < len(loc):
                choice = str(loc.pop(i + 1))
                break
        path = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section; check the spelling)"
            if choice is not None:
                msg = f"not a field of {choice!r} (each choice takes only its own fields)"
        got = e.get("input")
        shown = (
            "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        )
        if isinstance(got, dict) and e["type"].startswith("unknown_"):
            shown = f" (got {got.get('name', got.get('task'))!r})"
        lines.append(f"  {path}: {msg}{shown}")
    return "invalid config:\n" + "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}: empty key in dotted path")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set schedule.steps=10")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (default: the embedded tiny job) + overrides -> validated RunConfig."""
    tree = read_yaml(path if path is not None else DEFAULT_CONFIG)
    for item in overrides or []:
        _set_dotted(tree, *parse_override(item))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default made explicit) so a run is reproducible from its dir."""
    Path(path).write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
