"""Tiny-model bootstrap: tokenizer round trip, SFT encoding, the evaluation helpers, a reduced-budget build
that transformers and vLLM (in-process, CPU) both load and generate from, then a cache hit; and the same
bootstrap over the countdown task (its own alphabet, scorer and cache entry)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pipeline.data import addition as task
from pipeline.data import countdown
from pipeline.data.tiny_eval import expected_pass_at_1
from pipeline.data.tiny_model import cache_key, encode_sft, ensure_tiny_model, new_model
from pipeline.data.tokenizer import build_char_tokenizer
from schemas.data_config import CountdownTaskConfig, SyntheticTaskConfig, TinyModelConfig


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(task.SYMBOLS, max_length=64)


def test_char_tokenizer_round_trip(tok):
    text = "345+678=" + task.make_response(345, 678, 3)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(task.SYMBOLS)
    assert tok("x")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]


def test_encode_sft_masks_prompt_and_padding(tok):
    ids, labels = encode_sft(tok, ["1+2=", "10+20="], ["#3", "#30"])
    assert ids.shape == labels.shape == (2, 1 + 6 + 3 + 1)
    assert tok.decode(ids[0]) == "<s>1+2=#3</s><pad><pad><pad>"
    assert (
        labels[0].tolist() == [-100] * 5 + tok("#3", add_special_tokens=False)["input_ids"] + [2] + [-100] * 3
    )
    assert (labels[1, :7] == -100).all() and labels[1, -1] == tok.eos_token_id


def test_config_rejects_stop_outside_band():
    with pytest.raises(ValueError, match="stop_at"):
        TinyModelConfig(stop_at=0.7)


def test_default_addition_model_keeps_its_cache_key():
    # The key models were cached under before tasks were selectable: a cached default build stays valid.
    assert cache_key(TinyModelConfig(), SyntheticTaskConfig()) == "05fc32d2d3a4bd29"


def test_cache_key_differs_per_task_and_setting():
    tasks = (SyntheticTaskConfig(), CountdownTaskConfig(), CountdownTaskConfig(numbers=4))
    assert len({cache_key(TinyModelConfig(), t) for t in tasks}) == 3


def test_expected_pass_at_1_sums_the_solutions_of_a_problem():
    tok = build_char_tokenizer(countdown.SYMBOLS, max_length=64)
    torch.manual_seed(0)
    model = new_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    prompts = ["8,6,4>10="] * 2 + ["3,3,3>18="]
    responses = ["8+6=14;14-4=10;#10", "6-4=2;8+2=10;#10", "3+3=6;6*3=18;#18"]
    ids, labels = encode_sft(tok, prompts, responses)
    each = [expected_pass_at_1(model, ids[i : i + 1], labels[i : i + 1], pad_id=0) for i in range(3)]
    assert all(0 < p < 1 for p in each)
    grouped = expected_pass_at_1(model, ids, labels, pad_id=0, groups=[0, 0, 1])
    assert grouped == pytest.approx(sum(each) / 2, rel=1e-4)  # two problems: (p0 + p1) and p2
    assert expected_pass_at_1(model, ids, labels, pad_id=0) == pytest.approx(sum(each) / 3, rel=1e-4)


def test_countdown_bootstrap_builds_its_own_model(tmp_path, monkeypatch):
    monkeypatch.setenv("COVRL_CACHE", str(tmp_path / "cache"))
    cfg = TinyModelConfig(
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_sft_steps=4,
        eval_every=2,
        sft_batch_size=32,
        target_low=0.0,
        target_high=1.0,
        stop_at=0.0,
        eval_prompts=8,
        final_eval_prompts=8,
    )
    task_cfg = CountdownTaskConfig(n_train=200, n_eval=32)
    path = ensure_tiny_model(cfg, task_cfg, progress=False)
    assert path.name == cache_key(cfg, task_cfg) != cache_key(cfg, SyntheticTaskConfig())
    report = json.loads((path / "bootstrap.json").read_text())
    assert report["task"] == task_cfg.model_dump() and report["sft_steps"] == 2
    assert 0 <= report["pass_at_1_t1"] <= 1 and report["pass_at_k_problems"] == 8
    at = report["pass_at_k_t1"]
    assert set(at) == {"1", "4", "16"} and 0 <= at["1"] <= at["4"] <= at["16"] <= 1

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 4 + len(countdown.SYMBOLS)
    text = "8,6,4>10=8+6=14;14-4=10;#10"
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.e2e
def test_reduced_bootstrap_loads_in_transformers_and_vllm(tmp_path, monkeypatch):
    monkeypatch.setenv("COVRL_CACHE", str(tmp_path / "cache"))
    cfg = TinyModelConfig(
        max_sft_steps=4,
        eval_every=2,
        sft_batch_size=32,
        target_low=0.0,
        target_high=1.0,
        stop_at=0.0,
        eval_prompts=16,
        final_eval_prompts=16,
    )
    task_cfg = SyntheticTaskConfig(n_train=512, n_eval=32)
    path = ensure_tiny_model(cfg, task_cfg, progress=False)
    assert path == tmp_path / "cache" / "tiny" / cache_key(cfg, task_cfg)
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "bootstrap.json",
    } <= names
    report = json.loads((path / "bootstrap.json").read_text())
    assert report["sft_steps"] == 2 and 0 <= report["pass_at_1_t1"] <= 1 and report["total_seconds"] > 0
    assert 1.7e6 < report["n_params"] < 1.9e6
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 0)
    assert not list((tmp_path / "cache" / "tiny").glob(".*tmp-*"))  # temp build dir was renamed away

    t0 = time.perf_counter()
    assert ensure_tiny_model(cfg, task_cfg, progress=False) == path  # cache hit
    assert time.perf_counter() - t0 < 1.0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(hf_tok)
    enc = hf_tok(["345+678="], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=True, pad_token_id=hf_tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]

    # vLLM in a child process (engine in-process there): its distributed state must not leak into the
    # other tests of this session.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_CHECK, str(path)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == 2
    for r in got:
        assert r["prompt_ids"][0] == hf_tok.bos_token_id and len(r["prompt_ids"]) == 9
        assert len(r["ids"]) >= 1 and all(0 <= t < len(hf_tok) for t in r["ids"])
        assert r["text"] == hf_tok.decode(r["ids"], skip_special_tokens=True)
        # vLLM's sampled-token logprobs match transformers' on the same weights and tokens
        seq = torch.tensor([r["prompt_ids"] + r["ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1)
        n = len(r["prompt_ids"])
        hf_lp = [logp[n - 1 + i, t].item() for i, t in enumerate(r["ids"])]
        assert max(abs(a - b) for a, b in zip(hf_lp, r["logprobs"], strict=True)) < 1e-3


_VLLM_CHECK = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=64, enforce_eager=True, seed=0)
res = llm.generate(["345+678=", "100+200="], SamplingParams(temperature=1.0, max_tokens=40, logprobs=0))
out = [
    {"prompt_ids": list(r.prompt_token_ids), "ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text,
     "logprobs": [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]}
    for r in res
]
print(json.dumps(out))
"""


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    """Two threads asking for the same model: one builds (under the lock), the other waits and reuses it."""
    import threading

    from pipeline.data import tiny_model

    monkeypatch.setenv("COVRL_CACHE", str(tmp_path))
    calls = []

    def fake_build(cfg, task_cfg, out_dir, *, progress=True):
        calls.append(out_dir)
        time.sleep(0.3)
        (out_dir / "bootstrap.json").write_text("{}")
        return {}

    monkeypatch.setattr(tiny_model, "build_tiny_model", fake_build)
    cfg, task_cfg = TinyModelConfig(), SyntheticTaskConfig()
    stale = tmp_path / "tiny" / f".{cache_key(cfg, task_cfg)}.tmp-killed"  # left by a killed build
    stale.mkdir(parents=True)
    paths = []
    threads = [
        threading.Thread(target=lambda: paths.append(ensure_tiny_model(cfg, task_cfg, progress=False)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(paths)) == 1 and (paths[0] / "bootstrap.json").is_file()
    assert calls[0] != paths[0]  # built elsewhere, then renamed into place
    assert not stale.exists()


def test_failed_build_leaves_no_cache_entry(tmp_path, monkeypatch):
    from pipeline.data import tiny_model

    monkeypatch.setenv("COVRL_CACHE", str(tmp_path))

    def boom(cfg, task_cfg, out_dir, *, progress=True):
        (out_dir / "partial").write_text("x")
        raise RuntimeError("out of band")

    monkeypatch.setattr(tiny_model, "build_tiny_model", boom)
    with pytest.raises(RuntimeError, match="out of band"):
        ensure_tiny_model(TinyModelConfig(), SyntheticTaskConfig(), progress=False)
    assert [p.name for p in (tmp_path / "tiny").iterdir() if not p.name.endswith(".lock")] == []
