"""The real-tokenizer fixture model (``pipeline.data.chat_model``): what a Qwen2.5-Instruct directory has,
built offline, and chat prompts encoded exactly as HF encodes them."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.data.chat_model import IM_END, make_verl_rows
from pipeline.data.datasets import encode_rows, load_split
from schemas.data_config import DataConfig


def test_fixture_is_a_qwen2_chat_checkpoint(chat_model_path):
    conf = AutoConfig.from_pretrained(chat_model_path)
    tok = AutoTokenizer.from_pretrained(chat_model_path)
    assert conf.model_type == "qwen2" and conf.tie_word_embeddings
    report = json.loads((chat_model_path / "fixture.json").read_text())
    assert 1e6 < report["n_params"] < 1e7
    # the chat template lives in tokenizer_config.json, as in Qwen's hub checkpoints
    assert (
        "<|im_start|>" in json.loads((chat_model_path / "tokenizer_config.json").read_text())["chat_template"]
    )
    end = tok.convert_tokens_to_ids(IM_END)
    assert tok.eos_token == IM_END and tok.bos_token is None and tok.pad_token == "<|endoftext|>"
    gen = json.loads((chat_model_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [end, tok.pad_token_id] and conf.eos_token_id == end
    assert len(tok) <= conf.vocab_size


def test_tokenizer_is_byte_level_bpe(chat_model_path):
    tok = AutoTokenizer.from_pretrained(chat_model_path)
    text = "What is 17 + 25? √2 ≈ 1.414, naïve 😀 \\boxed{42}"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # any byte sequence round-trips, unseen characters included
    # merges learned from the corpus: a frequent word is one token; digits stay one per token (Qwen2's split)
    assert len(tok(" answer", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("2025", add_special_tokens=False)["input_ids"]) == 4


def test_verl_chat_prompts_encode_as_hf_apply_chat_template(chat_model_path, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_model_path)
    verl = make_verl_rows(4)
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "train.parquet")
    rows, _ = load_split(DataConfig(train_files=[str(tmp_path / "train.parquet")]), "train", tokenizer=tok)
    want = [
        tok.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
        for r in verl
    ]
    assert encode_rows(rows, tok) == [list(w) for w in want]
    assert (
        rows[0]["prompt"].endswith("<|im_start|>assistant\n") and rows[0]["prompt"].count("<|im_start|>") == 3
    )


def test_sampled_turns_end_with_im_end(chat_model_path):
    """The planted turn end: HF sampling from the fixture stops at <|im_end|> for most turns, after
    varying lengths (vLLM stops on the same ids: they are the generation config's eos_token_id)."""
    tok = AutoTokenizer.from_pretrained(chat_model_path)
    model = AutoModelForCausalLM.from_pretrained(chat_model_path, dtype=torch.float32)
    prompt = tok.apply_chat_template(
        make_verl_rows(1)[0]["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    torch.manual_seed(0)
    out = model.generate(**prompt, do_sample=True, max_new_tokens=64, num_return_sequences=16)
    turns = out[:, prompt["input_ids"].shape[1] :].tolist()
    end = tok.convert_tokens_to_ids(IM_END)
    lengths = [t.index(end) + 1 for t in turns if end in t]
    assert len(lengths) >= 12 and len(set(lengths)) > 4, lengths


def test_chat_prompts_for_a_model_without_template_stop_the_start(chat_model_path, tmp_path):
    """The same checkpoint with its chat_template removed, given verl chat prompts: the start stops before
    Ray or any actor, naming the model directory and the prompt field."""
    import shutil

    from pipeline.data.datasets import DataError
    from pipeline.train import parse_args, prepare

    plain = tmp_path / "no-template"
    shutil.copytree(chat_model_path, plain)
    conf = json.loads((plain / "tokenizer_config.json").read_text())
    del conf["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(conf))
    pq.write_table(pa.Table.from_pylist(make_verl_rows(4)), tmp_path / "train.parquet")
    args = parse_args(
        ["--set", f"model.path={plain}", "--set", f"data.train_files=[{tmp_path / 'train.parquet'}]"]
        + ["--set", f"run_dir={tmp_path}/run"]
    )
    with pytest.raises(DataError, match=rf"data.prompt_key 'prompt'.*\({plain}\) has no chat_template"):
        prepare(args)
    assert not (tmp_path / "run").exists()
