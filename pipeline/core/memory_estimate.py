"""Memory of a decoder-only transformer's learner step, its no-grad scoring and its KV cache, from its shape.

Pure arithmetic (no torch), used by ``covrl plan`` (pipeline/driver/memory_plan.py). The terms follow what
the code here keeps alive, for Llama/Qwen2-style blocks (RMSNorm, rotary attention through SDPA, SwiGLU)
in Hugging Face transformers:

Stored for backward per block and token, ``a`` = bytes of the compute dtype, ``h`` hidden, ``i`` MLP width:
    each RMSNorm      an fp32 copy of its input (4h) and its normalised output (a·h)      x 2 norms
    attention         q and k after rotary, v (K/V repeated to every head when padding masks are present),
                      the SDPA output and o_proj's contiguous input: 5h·a (flash/memory-efficient SDPA keeps
                      no L x L matrix, only a per-row log-sum-exp)
    SwiGLU MLP        gate, silu(gate), up, silu(gate)·up: 4i·a
With gradient checkpointing (non-reentrant) a block keeps only its input (h·a per token) and recomputes the
rest in backward, one block at a time. Backward also holds a block's gradient temporaries, (2h + 2i)·a per
token (the same either way). The padding mask is (b, 1, L, L) booleans.

The LM head (pipeline/core/logprobs.py): with the LM head whole (ZeRO <= 2) only the response positions'
hidden states go through it, ``chunk`` rows at a time, so the head costs those hidden states, a few
(chunk x V) fp32 buffers and, in backward, the head's gradient in fp32 (plus its cast to a 16-bit weight).
Under ZeRO-3 the model computes full logits (b x L x V at ``a``), the response rows are gathered (R x V) and backward holds
their gradient and the full logits' gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
#: (chunk x V) fp32 buffers alive at once in the chunked log-prob/entropy backward: the chunk's fp32 logits,
#: log-softmax, probabilities and gradient (pipeline/core/logprobs.py: _chunk_grad).
CHUNK_BUFFERS = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelArch:
    """What memory depends on: the shape of a Llama/Qwen2-style decoder."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    head_dim: int = 0  # 0: hidden // heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.dim_per_head
        q = self.heads * self.dim_per_head
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0)
        block = attn + 3 * h * self.intermediate + 2 * h
        embed = self.vocab * h * (1 if self.tied_embeddings else 2)
        return embed + self.layers * block + h

    @property
    def largest_layer_params(self) -> int:
        """The largest single module (DeepSpeed's ZeRO-3 estimate gathers one at a time): the embedding."""
        return max(self.vocab * self.hidden, 3 * self.hidden * self.intermediate)

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, {self.heads} heads / {self.kv_heads} KV heads, "
            f"MLP {self.intermediate}, vocab {self.vocab}; "
            + (f"{self.params / 1e9:.2f}B" if self.params >= 1e8 else f"{self.params / 1e6:.1f}M")
            + " parameters"
        )


#: config.json values of the Qwen2.5 base models (Hugging Face hub), for presets whose weights are not on
#: this machine.
KNOWN_ARCHS: dict[str, ModelArch] = {
    a.name: a
    for a in (
        ModelArch("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151_936, tied_embeddings=True, qkv_bias=True),
        ModelArch("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151_936, tied_embeddings=True, qkv_bias=True),
        ModelArch("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152_064, tied_embeddings=False, qkv_bias=True),
        ModelArch("Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152_064, tied_embeddings=False, qkv_bias=True),
    )
}


def known_arch(model_path: str) -> ModelArch | None:
    """The table entry whose name ends ``model_path`` (``Qwen/Qwen2.5-7B``, ``/models/Qwen2.5-7B``, and
    ``-Instruct`` variants, which share the base model's shape)."""
    tail = model_path.rstrip("/").split("/")[-1].lower().removesuffix("-instruct")
    return next((a for n, a in KNOWN_ARCHS.items() if n.lower() == tail), None)


def arch_from_hf_config(name: str, conf: dict) -> ModelArch:
    """From a Hugging Face config.json (Llama, Qwen2 and relatives); a missing field is named."""
    try:
        return ModelArch(
            name=name,
            hidden=int(conf["hidden_size"]),
            layers=int(conf["num_hidden_layers"]),
            heads=int(conf["num_attention_heads"]),
            kv_heads=int(conf.get("num_key_value_heads") or conf["num_attention_heads"]),
            intermediate=int(conf["intermediate_size"]),
            vocab=int(conf["vocab_size"]),
            tied_embeddings=bool(conf.get("tie_word_embeddings", False)),
            qkv_bias=bool(conf.get("attention_bias", conf.get("model_type") == "qwen2")),
            head_dim=int(conf.get("head_dim") or 0),
        )
    except KeyError as e:
        raise ValueError(f"{name}: config.json has no {e.args[0]!r}; cannot size the model") from None


def block_stored_bytes(arch: ModelArch, tokens: int, a: int) -> int:
    """Activations one block stores for backward (module docstring)."""
    h, i = arch.hidden, arch.intermediate
    return tokens * (2 * (4 * h + a * h) + 5 * h * a + 4 * i * a)


def block_backward_bytes(arch: ModelArch, tokens: int, a: int) -> int:
    """A block's gradient temporaries while its backward runs."""
    return tokens * (2 * arch.hidden + 2 * arch.intermediate) * a


def head_bytes(
    arch: ModelArch,
    *,
    tokens: int,
    response_tokens: int,
    a: int,
    full_logits: bool,
    chunk: int,
    backward: bool,
) -> int:
    """The LM head's log-prob/entropy path (module docstring) at its peak."""
    v, h = arch.vocab, arch.hidden
    chunks = CHUNK_BUFFERS * min(chunk, max(response_tokens, 1)) * v * 4
    if full_logits:
        if not backward:
            return (tokens + response_tokens) * v * a + chunks
        return (tokens + 2 * response_tokens) * v * a + chunks
    picked = response_tokens * h * a
    if not backward:
        return picked + chunks
    return 2 * picked + chunks + v * h * (4 + (a if a != 4 else 0))  # fp32 head gradient, then its cast


@dataclass(frozen=True)
class StepMemory:
    """Peak bytes of one learner micro-batch (forward + backward), beyond the model states."""

    stored: int  # activations kept for backward (all blocks, or the block inputs with checkpointing)
    working: int  # one block's recomputed activations (checkpointing) + its gradient temporaries
    mask: int
    head: int

    @property
    def total(self) -> int:
        return self.stored + self.working + self.mask + self.head


def learner_step_bytes(
    arch: ModelArch,
    *,
    rows: int,
    seq_len: int,
    response_len: int,
    dtype: str,
    checkpointing: bool,
    full_logits: bool,
    chunk: int = 1024,
) -> StepMemory:
    """One micro-batch of ``rows`` sequences padded to ``seq_len`` tokens, ``response_len`` of them scored."""
    a = DTYPE_BYTES[dtype]
    tokens, resp = rows * seq_len, rows * response_len
    block = block_stored_bytes(arch, tokens, a)
    final_norm = tokens * arch.hidden * (4 + a)
    if checkpointing:
        stored = arch.layers * tokens * arch.hidden * a + final_norm
        working = block + block_backward_bytes(arch, tokens, a)
    else:
        stored = arch.layers * block + final_norm
        working = block_backward_bytes(arch, tokens, a)
    head = head_bytes(
        arch, tokens=tokens, response_tokens=resp, a=a, full_logits=full_logits, chunk=chunk, backward=True
    )
    return StepMemory(stored=stored, working=working, mask=rows * seq_len * seq_len, head=head)


def scoring_bytes(
    arch: ModelArch,
    *,
    rows: int,
    seq_len: int,
    response_len: int,
    dtype: str,
    full_logits: bool,
    chunk: int = 1024,
) -> int:
    """Peak of a no-grad log-prob pass (old log-probs, the reference): one block's activations at a time, the
    residual stream, the mask and the head's forward."""
    a = DTYPE_BYTES[dtype]
    tokens = rows * seq_len
    head = head_bytes(
        arch,
        tokens=tokens,
        response_tokens=rows * response_len,
        a=a,
        full_logits=full_logits,
        chunk=chunk,
        backward=False,
    )
    return block_stored_bytes(arch, tokens, a) + 2 * tokens * arch.hidden * a + rows * seq_len**2 + head


def kv_bytes_per_token(arch: ModelArch, dtype: str, tensor_parallel: int) -> int:
    """K and V of every layer for one token, on one GPU of a tensor-parallel group (KV heads are split across
    the group, each GPU keeping at least one)."""
    heads_per_gpu = max(1, -(-arch.kv_heads // tensor_parallel))
    return 2 * arch.layers * heads_per_gpu * arch.dim_per_head * DTYPE_BYTES[dtype]
