"""Random-weight HF model directories for benchmarks (built locally from a config; no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.data.tokenizer import build_char_tokenizer

SYMBOLS = list("0123456789+=;#")

SIZES = {
    # the embedded tiny architecture (head_dim 32: a size vLLM's CPU attention supports)
    "tiny": dict(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
        vocab_size=18,
    ),
    # the scaling sweep's wider models (bench_scaling.py): same vocabulary and head_dim 32, ~6x and ~22x
    # the tiny model's parameters, so the sweep shows how each system's cost grows with the matmuls
    "10m": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=18,
    ),
    "40m": dict(
        hidden_size=640,
        intermediate_size=1728,
        num_hidden_layers=8,
        num_attention_heads=20,
        num_key_value_heads=20,
        vocab_size=18,
    ),
    # activations dominate: small weights, many wide blocks (gradient-checkpointing memory checks)
    "act": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=18,
    ),
    # Qwen2.5-0.5B's block and vocabulary (hidden 896, 14 heads / 2 KV heads, MLP 4864, vocab 151,936, tied)
    # with 2 of its 24 blocks: memory checks of the 0.5B shape within a few GiB of a shared 2-core box
    "0.5b-2l": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=2,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151_936,
    ),
    # ~0.5B parameters, Qwen2.5-0.5B-like shape (vocab 151,936, tied embeddings)
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151_936,
    ),
}


def build_random_model(size: str, out_dir: str | Path, *, max_positions: int = 512) -> Path:
    """``max_positions``: prompt + response tokens the model (and its tokenizer) accept."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer(SYMBOLS, max_length=max_positions)
    tok.save_pretrained(out)
    spec = dict(SIZES[size])
    cfg = LlamaConfig(
        **spec,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def n_params(path: str | Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            total += (
                f.get_slice(k).get_shape().numel()
                if hasattr(f.get_slice(k).get_shape(), "numel")
                else int(torch.tensor(f.get_slice(k).get_shape()).prod())
            )
    return total
