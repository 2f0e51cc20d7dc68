"""covrl plan: every shipped preset fits, an oversized plan is refused naming the role and the numbers, and
the shape arithmetic agrees with transformers' own models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.memory_estimate import KNOWN_ARCHS, arch_from_hf_config, known_arch, learner_step_bytes
from pipeline.driver.config_io import load_config
from pipeline.driver.memory_plan import PlanError, main, make_plan

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs" / "presets").glob("*.yaml"))


def test_there_are_presets():
    assert len(PRESETS) >= 6


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_shipped_preset_fits(preset, capsys):
    assert main(["--config", str(preset)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "built-in table" in out  # the Qwen2.5 weights are not on this machine: the output says so
    assert "plan fits." in out


def test_an_oversized_learner_is_refused_naming_the_role_and_the_numbers(capsys):
    preset = str(ROOT / "configs/presets/qwen2.5-7b-grpo.yaml")
    sets = ["--set", "learner.gradient_checkpointing=false", "--set", "learner.micro_batch_size=4"]
    assert main(["--config", preset, *sets]) == 1
    err = capsys.readouterr().err
    assert "does not fit: learner: needs" in err and "per GPU, the GPU has 80.0 GiB" in err
    assert "learner.gradient_checkpointing=true" in err  # the way out is named


def test_a_generator_whose_weights_leave_no_kv_cache_is_refused(capsys):
    preset = str(ROOT / "configs/presets/qwen2.5-32b-grpo.yaml")
    assert main(["--config", preset, "--gpu-mem", "32"]) == 1
    err = capsys.readouterr().err
    assert "does not fit: generator: vLLM's" in err and "max_model_len 10240" in err


def test_a_smaller_gpu_refuses_what_a_larger_one_takes():
    cfg = load_config(ROOT / "configs/presets/qwen2.5-7b-kl-cov.yaml")
    assert not make_plan(cfg, 80).problems
    learner = make_plan(cfg, 24).problems
    assert learner and learner[0].startswith("learner:")


def test_checkpointing_cuts_the_estimated_activations_and_they_grow_with_the_micro_batch():
    arch = KNOWN_ARCHS["Qwen2.5-7B"]
    kw = dict(seq_len=4096, response_len=3072, dtype="bfloat16", full_logits=False)
    off = learner_step_bytes(arch, rows=2, checkpointing=False, **kw)
    on = learner_step_bytes(arch, rows=2, checkpointing=True, **kw)
    assert on.stored < off.stored / 10
    assert learner_step_bytes(arch, rows=4, checkpointing=False, **kw).stored == pytest.approx(
        2 * off.stored, rel=0.01
    )


@pytest.mark.parametrize("name", sorted(KNOWN_ARCHS))
def test_parameter_count_matches_transformers(name):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    a = KNOWN_ARCHS[name]
    conf = Qwen2Config(
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        intermediate_size=a.intermediate,
        vocab_size=a.vocab,
        tie_word_embeddings=a.tied_embeddings,
    )
    with torch.device("meta"):
        model = Qwen2ForCausalLM(conf)
    assert a.params == sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    assert arch_from_hf_config(name, conf.to_dict()) == a


def test_the_shape_comes_from_a_readable_config_json(tmp_path):
    conf = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "tie_word_embeddings": True}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(conf))
    cfg = load_config(None, [f"model.path={tmp_path}"])
    plan = make_plan(cfg)
    assert plan.arch.hidden == 64 and plan.arch.kv_heads == 2 and plan.arch_source.endswith("config.json")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in conf.items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match="config.json has no 'vocab_size'"):
        make_plan(cfg)


def test_an_unknown_model_without_config_is_named():
    cfg = load_config(None, ["model.path=someone/Mystery-3B"])
    with pytest.raises(PlanError, match="model.path someone/Mystery-3B: no config.json"):
        make_plan(cfg)
    assert known_arch("/models/Qwen2.5-7B-Instruct/") == KNOWN_ARCHS["Qwen2.5-7B"]


def test_the_default_cpu_job_is_planned_on_the_host(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "learner: host memory per replica, not checked against a device" in out and "embedded tiny" in out
    assert "1.8M parameters" in out


def test_bad_gpu_memory_is_named(capsys):
    assert main(["--gpu-mem", "0"]) == 2
    assert "--gpu-mem must be > 0" in capsys.readouterr().err
