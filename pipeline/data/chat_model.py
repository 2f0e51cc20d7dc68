"""A real-tokenizer chat model built offline: a small Qwen2 with a byte-level BPE and a Qwen chat template.

Why: the embedded tiny model uses a character tokenizer without a chat template, so it cannot exercise
what real checkpoints need: byte-level BPE ids, ``<|im_start|>``/``<|im_end|>`` prompts rendered by the
tokenizer's own template, an EOS that is the template's end token (not a BOS/EOS pair), verl-format chat
datasets. No hub is reachable here, so this builds the same kind of directory a Qwen2.5-Instruct
checkpoint has, from scratch, in well under a minute on 2 cores:

- ``tokenizer.json``: BPE trained with ``tokenizers`` on a generated math corpus, with Qwen2's
  pre-tokenizer (its split regex, digits one by one, then byte-level) and specials ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>``;
- ``tokenizer_config.json``: ``chat_template`` (Qwen2's, without tools), ``eos_token`` ``<|im_end|>``,
  ``pad_token`` ``<|endoftext|>``, no BOS, as Qwen2.5-Instruct;
- ``config.json`` + ``model.safetensors``: ``Qwen2ForCausalLM`` (grouped-query attention, q/k/v biases,
  tied embeddings), a few million parameters, random weights. Training them to a real format is beyond a
  test fixture's budget on 2 shared cores (one SFT step of this size costs seconds), so one thing is
  planted instead: every embedding gets a constant first coordinate and ``<|im_end|>`` a larger one,
  which after the final norm raises the end token's logit by a nearly fixed amount at every position.
  Sampled turns then end with ``<|im_end|>`` after ~``1/p_turn_end`` tokens (generation really stops at
  the template's end token, lengths vary) while every other token stays random;
- ``generation_config.json``: ``eos_token_id`` = [``<|im_end|>``, ``<|endoftext|>``], as Qwen2.5.

``ensure_chat_model`` caches it under ``$COVRL_CACHE/chat/<settings hash>``. ``make_verl_rows`` writes
problems of the same kind in verl's dataset columns (for tests and the GPU check).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from pipeline.data.model_cache import ensure_built, settings_key

#: Bump when the recipe changes in a way ``ChatModelSpec`` does not capture (invalidates the cache).
CODE_VERSION = "chat-v1"
MARKER = "fixture.json"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION = "Put the final answer in \\boxed{}."
DATA_SOURCE = "lighteval/MATH"  # a verl math source: routed to the math verifier
# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, newlines.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's template, tool calls left out: a default system turn, then each message, then the assistant
# header when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatModelSpec:
    """Sizes of the fixture (defaults: ~2.5M parameters) and the planted per-token chance of ending a turn."""

    vocab_size: int = 512  # at most: BPE stops when the corpus has no pair left to merge
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    corpus_size: int = 4000
    p_turn_end: float = 0.08
    threads: int = 2
    seed: int = 0

    def key(self) -> str:
        return settings_key({"spec": asdict(self), "code": CODE_VERSION})


def ensure_chat_model(spec: ChatModelSpec | None = None) -> Path:
    """Path of the fixture for ``spec`` (default sizes), building it once into the covrl cache."""
    spec = spec or ChatModelSpec()
    return ensure_built("chat", spec.key(), MARKER, lambda tmp: build_chat_model(tmp, spec))


def problem(rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) of one addition problem with 1- or 2-digit operands."""
    a, b = (int(x) for x in rng.integers(0, 30, size=2))
    return f"What is {a} + {b}?", str(a + b)


def solution(question: str, answer: str) -> str:
    """The reference assistant turn: the sum written out, then the boxed answer."""
    expr = question.removeprefix("What is ").removesuffix("?")
    return f"{expr} = {answer}. The answer is \\boxed{{{answer}}}."


def user_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{question} {INSTRUCTION}"}]


def make_verl_rows(n: int, *, seed: int = 1, split: str = "train") -> list[dict[str, Any]]:
    """``n`` problems in verl's dataset columns, as its preprocessing scripts write them."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        question, answer = problem(rng)
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": user_messages(question),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {"split": split, "index": i, "answer": answer, "question": question},
            }
        )
    return rows


def train_tokenizer(texts: list[str], vocab_size: int, *, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``, configured as Qwen2's (specials first: ids 0, 1, 2)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_chat_model(out_dir: Path, spec: ChatModelSpec) -> dict:
    """Train the tokenizer, build the model, plant the turn end, save the HF directory; returns the report."""
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        rng = np.random.default_rng(spec.seed)
        pairs = [problem(rng) for _ in range(spec.corpus_size)]
        prompts_msgs = [user_messages(q) for q, _ in pairs]
        responses = [solution(q, a) for q, a in pairs]
        tokenizer = train_tokenizer(
            [CHAT_TEMPLATE, SYSTEM_PROMPT, *(m[0]["content"] for m in prompts_msgs), *responses],
            spec.vocab_size,
            max_length=spec.max_position_embeddings,
        )
        model = _new_model(spec, tokenizer)
        texts = [
            tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + r
            for m, r in zip(prompts_msgs[:16], responses[:16], strict=True)
        ]
        p_end = _plant_turn_end(model, tokenizer, texts, spec.p_turn_end)
    finally:
        torch.set_num_threads(prev_threads)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # the template inside tokenizer_config.json
    report = {
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "p_turn_end": round(p_end, 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "spec": asdict(spec),
        "code_version": CODE_VERSION,
    }
    (out_dir / MARKER).write_text(json.dumps(report, indent=2))
    return report


def _new_model(spec: ChatModelSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    torch.manual_seed(spec.seed)
    pad, eos = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    return model


@torch.no_grad()
def _plant_turn_end(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str], target: float
) -> float:
    """Set the embeddings' first coordinate so that the mean next-token probability of ``<|im_end|>``
    over ``texts`` is ~``target``; returns the measured value.

    With a shared constant there, the final norm's output has a large, nearly position-independent first
    coordinate ``c``; tied embeddings turn an extra ``d`` on the end token's row into a logit gap ``c*d``.
    ``d`` is found by a few multiplicative corrections (the gap moves the probability smoothly).
    """
    end = tokenizer.convert_tokens_to_ids(IM_END)
    emb = model.get_input_embeddings().weight
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    emb[:, 0] = 1.0
    for _ in range(4):
        out = model(**enc, output_hidden_states=True)
        p = float(out.logits.softmax(-1)[..., end][mask].mean())
        c = float(out.hidden_states[-1][..., 0][mask].mean())
        emb[end, 0] += math.log(target / p) / c
    out = model(**enc)
    return float(out.logits.softmax(-1)[..., end][mask].mean())
