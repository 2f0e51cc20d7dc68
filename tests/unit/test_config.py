"""Run config: YAML + dotted overrides, errors that name the field path, every shipped config parses."""

from pathlib import Path

import pytest
import yaml

from pipeline.driver.config_io import ConfigError, dump_config, load_config
from schemas.run_config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    from pipeline.data.verifiers.base import check_verifiers

    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    check_verifiers(cfg.verifier)  # every verifier it names exists and takes its options


def test_override_by_dotted_path_and_yaml_scalars():
    cfg = load_config(
        None, ["algorithm.policy_loss.name=kl_cov", "learner.lr=3e-5", "generator.engine_kwargs={a: 1}"]
    )
    assert cfg.algorithm.policy_loss.name == "kl_cov"
    assert cfg.learner.lr == pytest.approx(3e-5)
    assert cfg.generator.engine_kwargs == {"a": 1}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("learner.nope=1", "learner.nope: unknown key"),
        ("schedule.steps=abc", "schedule.steps: Input should be a valid integer"),
        ("learner.lr=-1", "learner.lr: Input should be greater than 0"),
        ("algorithm.policy_loss.clip_cov_lb=9", "algorithm.policy_loss.clip_cov_lb: not a field of 'ppo'"),
        ("algorithm.policy_loss.name=foo", "unknown policy loss name"),
        ("learner.mini_batches=5", "must be divisible by learner.mini_batches"),
        ("learner", "expected KEY=VALUE"),
        ("schedule.steps.x=1", "'schedule.steps' is a value, not a section"),
        (
            "metrics.wandb.mode=cloud",
            "metrics.wandb.mode: Input should be 'offline' or 'online' (got 'cloud')",
        ),
    ],
)
def test_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_policy_loss_config_is_chosen_by_name():
    """Each loss takes only its own fields; the band check of Clip-Cov still applies."""
    cfg = load_config(
        None, ["algorithm.policy_loss={name: clip_cov, clip_cov_lb: 0.5, clip_ratio_high: 0.28}"]
    )
    assert type(cfg.algorithm.policy_loss).__name__ == "ClipCovLossConfig"
    assert cfg.algorithm.policy_loss.clip_ratio_high == 0.28
    with pytest.raises(ConfigError, match="clip_cov_lb must be < clip_cov_ub"):
        load_config(None, ["algorithm.policy_loss={name: clip_cov, clip_cov_lb: 9}"])
    with pytest.raises(ConfigError, match=r"policy_loss.clip_ratio_low: not a field of 'kl_cov'"):
        load_config(None, ["algorithm.policy_loss={name: kl_cov, clip_ratio_low: 0.1}"])
    with pytest.raises(ConfigError, match=r"unknown policy loss name.*\(got 'nope'\)"):
        load_config(None, ["algorithm.policy_loss.name=nope"])
    custom = load_config(None, ["algorithm.policy_loss={name: 'my.losses:pg', options: {beta: 2}}"])
    assert custom.algorithm.policy_loss.options == {"beta": 2}


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["schedule.steps=7", "name=rt"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["schedule"]["steps"] == 7


def test_kl_cov_on_policy_warning():
    cfg = load_config(None, ["algorithm.policy_loss.name=kl_cov", "learner.mini_batches=1"])
    assert any("no-op" in w for w in cfg.warnings())
    assert not load_config(None, ["algorithm.policy_loss.name=kl_cov"]).warnings()


def test_invalid_yaml_file_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schedule: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_async_core_lending_that_oversubscribes_warns():
    lend = ["schedule.mode=async", "learner.threads=2", "learner.threads_while_generating=1"]
    assert any("oversubscribed" in w for w in load_config(None, [*lend, "generator.threads=2"]).warnings())
    assert not load_config(None, [*lend, "generator.threads=1"]).warnings()


@pytest.mark.parametrize(
    "override",
    [
        "learner.lr=inf",
        "learner.lr=.nan",
        "learner.grad_clip=.inf",
        "algorithm.policy_loss={name: clip_cov, clip_cov_ub: .inf}",
        "algorithm.policy_loss={name: clip_cov, clip_cov_lb: -.inf}",
        "verifier.timeout_s=nan",
        "generator.resources.custom={gen_node: .inf}",
        "schedule.eval_temperature=inf",
        "model.tiny.max_seconds=inf",
    ],
)
def test_non_finite_floats_are_rejected_naming_the_field(override):
    field = override.split("=")[0]
    if field == "algorithm.policy_loss":  # a whole section: name the field inside it
        field += "." + override.split("{name: clip_cov, ")[1].split(":")[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"{field}" in str(e.value) and "finite number" in str(e.value)
