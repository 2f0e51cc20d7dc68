"""``covrl plan``: will each role of a run fit in its device's memory? Estimated before any GPU is paid for.

Per role, per device: the learner rank (DeepSpeed model states under its ZeRO stage from DeepSpeed's own
estimators, activations of one micro-batch of ``micro_batch_size x (prompt + response)`` tokens with and
without gradient checkpointing, the chunked log-prob/entropy buffers, the weight-sync bucket), each generator
GPU (vLLM takes ``gpu_memory_utilization`` of it: weights, a reserve for its own activations, and the KV cache
in the rest) and the reference (kept on the host in fp32 by actors/reference.py). The arithmetic is in
pipeline/core/memory_estimate.py; docs/deploy.md compares it with measured peaks.

The model's shape comes from ``model.path``'s config.json, else (a hub id not on this machine) from a table of
known models, which the output says.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from actors.learner import model_states_bytes
from pipeline.core.memory_estimate import (
    DTYPE_BYTES,
    GIB,
    KNOWN_ARCHS,
    ModelArch,
    arch_from_hf_config,
    known_arch,
    kv_bytes_per_token,
    learner_step_bytes,
    scoring_bytes,
)
from schemas.run_config import RunConfig

DEFAULT_GPU_GIB = 80.0  # an 80 GB H100 / A100
#: GPUs per node assumed for DeepSpeed's estimators (only the total count changes the GPU estimate).
GPUS_PER_NODE = 8
#: vLLM's memory inside its gpu_memory_utilization besides weights and KV cache: CUDA context and graphs
#: (~1 GiB), plus the activations of its profiling batch (below). vLLM measures the real value at start.
VLLM_FIXED_RESERVE = GIB
VLLM_DEFAULT_BATCHED_TOKENS = 8192
#: A learner process's memory besides tensors: on a GPU the CUDA context, NCCL's buffers and allocator slack
#: (assumed); on the host DeepSpeed's shared-memory comm workspace and gloo (measured: ~0.1 GiB, docs/deploy.md).
LEARNER_RUNTIME = {"GPU": GIB, "host": GIB // 10}
VLLM_DEFAULT_MAX_SEQS = 256


class PlanError(ValueError):
    """The plan cannot be made (the model's shape is unknown); the message says what to provide."""


@dataclass
class RoleMemory:
    role: str
    device: str  # "GPU" (checked against the GPU size) or "host" (reported only)
    parts: dict[str, int]
    capacity: int | None = None  # bytes available on the device, None for host roles
    notes: list[str] = field(default_factory=list)
    problem: str | None = None  # set when the role does not fit

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class MemoryPlan:
    arch: ModelArch
    arch_source: str
    gpu_bytes: int
    roles: list[RoleMemory]

    @property
    def problems(self) -> list[str]:
        return [r.problem for r in self.roles if r.problem]


def resolve_arch(cfg: RunConfig) -> tuple[ModelArch, str]:
    """(shape, where it came from)."""
    if cfg.model.path is None:
        from pipeline.data.tasks import task_spec
        from pipeline.data.tokenizer import SPECIALS

        t = cfg.model.tiny
        vocab = len(SPECIALS) + len(task_spec(cfg.data.synthetic).symbols)
        arch = ModelArch("embedded tiny", t.hidden_size, t.num_layers, t.num_heads, t.num_heads,
                         t.intermediate_size, vocab, tied_embeddings=True)  # fmt: skip
        return arch, "model.tiny (the embedded tiny model)"
    conf = Path(cfg.model.path).expanduser() / "config.json"
    if conf.is_file():
        return arch_from_hf_config(cfg.model.path, json.loads(conf.read_text())), str(conf)
    arch = known_arch(cfg.model.path)
    if arch is None:
        raise PlanError(
            f"model.path {cfg.model.path}: no config.json readable here and not a known model name "
            f"({', '.join(KNOWN_ARCHS)}); point model.path at a directory holding its config.json"
        )
    return arch, f"built-in table ({arch.name}; {cfg.model.path}/config.json is not readable here)"


def _rows_per_micro_batch(cfg: RunConfig, seq_len: int) -> int:
    """Sequences in a learner micro-batch at worst: micro_batch_size (or what the token budget admits at full
    length), capped by a rank's share of a mini-batch."""
    learner = cfg.learner
    share = cfg.schedule.prompts_per_step * cfg.schedule.group_size // (learner.mini_batches * learner.ranks)
    rows = learner.micro_batch_size
    if learner.micro_batch_tokens is not None:
        rows = max(1, learner.micro_batch_tokens // seq_len)
    return max(1, min(rows, share))


def _lengths(cfg: RunConfig) -> tuple[int, int]:
    """(longest sequence, longest response) a learner micro-batch pads to."""
    gen = cfg.generator
    prompt = cfg.data.max_prompt_tokens or gen.max_model_len - gen.max_new_tokens
    return min(gen.max_model_len, prompt + gen.max_new_tokens), gen.max_new_tokens


def _gpus(resources) -> float:
    return float(resources.num_gpus or 0)


def learner_memory(cfg: RunConfig, arch: ModelArch, gpu_bytes: int) -> RoleMemory:
    lc = cfg.learner
    seq_len, resp_len = _lengths(cfg)
    rows = _rows_per_micro_batch(cfg, seq_len)
    full_logits = lc.zero_stage == 3  # ZeRO-3 shards the LM head: the whole model runs (actors/learner.py)
    states = model_states_bytes(
        arch.params,
        arch.largest_layer_params,
        zero_stage=lc.zero_stage,
        ranks=lc.ranks,
        ranks_per_node=GPUS_PER_NODE,
        dtype=lc.dtype,
    )
    step = {
        on: learner_step_bytes(
            arch,
            rows=rows,
            seq_len=seq_len,
            response_len=resp_len,
            dtype=lc.dtype,
            checkpointing=on,
            full_logits=full_logits,
        )
        for on in (False, True)
    }
    chosen = step[lc.gradient_checkpointing]
    scoring = scoring_bytes(
        arch, rows=rows, seq_len=seq_len, response_len=resp_len, dtype=lc.dtype, full_logits=full_logits
    )
    parts = {f"model states: {k}": v for k, v in states.items()}
    if max(chosen.total, scoring) == chosen.total:
        parts["activations (stored for backward)"] = chosen.stored
        parts["activations (one block's backward)"] = chosen.working
        parts["attention padding mask"] = chosen.mask
        parts["log-prob/entropy head" + (" (full logits, ZeRO-3)" if full_logits else " (chunked)")] = (
            chosen.head
        )
    else:
        parts["no-grad log-prob pass (larger than the training micro-batch)"] = scoring
    if cfg.weight_sync.method == "collective":
        parts["weight-sync bucket"] = int(cfg.weight_sync.bucket_mb * 2**20)
    gpu = _gpus(lc.resources) > 0
    device = "GPU" if gpu else "host"
    parts["runtime (CUDA context, NCCL)" if gpu else "runtime (DeepSpeed comm workspace, gloo)"] = (
        LEARNER_RUNTIME[device]
    )
    role = RoleMemory("learner", device, parts, capacity=gpu_bytes if gpu else None)
    ck = "on" if lc.gradient_checkpointing else "off"
    role.notes.append(
        f"{lc.ranks} rank(s), ZeRO-{lc.zero_stage}, {lc.dtype}, micro-batch {rows} x {seq_len} tokens "
        f"({resp_len} scored), gradient checkpointing {ck}"
    )
    role.notes.append(
        "activations + head, checkpointing off / on: "
        f"{_gib(step[False].total)} / {_gib(step[True].total)} GiB"
    )
    if gpu and role.total > gpu_bytes:
        hint = "" if lc.gradient_checkpointing else "; try learner.gradient_checkpointing=true"
        hint += "; lower learner.micro_batch_size" if rows > 1 else ""
        hint += (
            "; raise learner.zero_stage"
            if lc.zero_stage < 3
            else "; add learner ranks (ZeRO-3 shards the states)"
        )
        role.problem = (
            f"learner: needs {_gib(role.total)} GiB per GPU, the GPU has {_gib(gpu_bytes)} GiB "
            f"(model states {_gib(sum(states.values()))}, activations + head {_gib(chosen.total)}){hint}"
        )
    return role


def generator_memory(cfg: RunConfig, arch: ModelArch, gpu_bytes: int) -> RoleMemory:
    gen = cfg.generator
    gpu = _gpus(gen.resources) > 0
    if not gpu:
        dtype = "float32"  # actors/generator.py serves fp32 on CPU
        parts = {
            "weights": arch.params * DTYPE_BYTES[dtype],
            "KV cache (generator.kv_cache_gib)": int(gen.kv_cache_gib * GIB),
        }
        role = RoleMemory("generator", "host", parts)
        role.notes.append(f"{gen.replicas} replica(s) on CPU, {dtype}")
        return role
    dtype = str(gen.engine_kwargs.get("dtype", "auto"))
    dtype = "bfloat16" if dtype == "auto" else dtype
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"generator.engine_kwargs.dtype: {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    tp = gen.tensor_parallel_size
    budget = int(gen.gpu_memory_utilization * gpu_bytes)
    weights = arch.params * DTYPE_BYTES[dtype] // tp
    tokens = int(gen.engine_kwargs.get("max_num_batched_tokens", VLLM_DEFAULT_BATCHED_TOKENS))
    seqs = int(gen.engine_kwargs.get("max_num_seqs", VLLM_DEFAULT_MAX_SEQS))
    reserve = (
        VLLM_FIXED_RESERVE
        + tokens * (arch.hidden + 2 * arch.intermediate // tp) * DTYPE_BYTES[dtype] * 2
        + seqs * arch.vocab * 4
    )
    kv = budget - weights - reserve
    per_token = kv_bytes_per_token(arch, dtype, tp)
    parts = {"weights": weights, "activation / CUDA-graph reserve": reserve, "KV cache": max(kv, 0)}
    role = RoleMemory("generator", "GPU", parts, capacity=budget)
    kv_tokens = max(kv, 0) // per_token
    role.notes.append(
        f"{gen.replicas} replica(s) x TP {tp}, {dtype}; vLLM takes gpu_memory_utilization "
        f"{gen.gpu_memory_utilization} x {_gib(gpu_bytes)} = {_gib(budget)} GiB per GPU"
    )
    role.notes.append(
        f"KV cache: {kv_tokens:,} tokens ({per_token / 2**20:.3f} MiB/token per GPU) = "
        f"{kv_tokens // gen.max_model_len} sequences of max_model_len {gen.max_model_len} at once"
    )
    if kv < per_token * gen.max_model_len:
        role.problem = (
            f"generator: vLLM's {_gib(budget)} GiB per GPU (gpu_memory_utilization {gen.gpu_memory_utilization} "
            f"x {_gib(gpu_bytes)} GiB) leaves {_gib(max(kv, 0))} GiB of KV cache after {_gib(weights)} GiB of "
            f"weights and a {_gib(reserve)} GiB reserve, less than one sequence of max_model_len "
            f"{gen.max_model_len} needs ({_gib(per_token * gen.max_model_len)} GiB); raise "
            "generator.tensor_parallel_size or gpu_memory_utilization"
        )
    return role


def reference_memory(cfg: RunConfig, arch: ModelArch) -> RoleMemory:
    seq_len, resp_len = _lengths(cfg)
    rows = min(cfg.reference.micro_batch_size, cfg.schedule.prompts_per_step * cfg.schedule.group_size)
    parts = {
        "weights (fp32)": arch.params * 4,
        "no-grad log-prob pass": scoring_bytes(
            arch, rows=rows, seq_len=seq_len, response_len=resp_len, dtype="float32", full_logits=False
        ),
    }
    role = RoleMemory("reference", "host", parts)
    role.notes.append(
        f"{cfg.reference.replicas} replica(s); actors/reference.py keeps the model on the host in fp32 "
        f"(micro-batch {rows} x {seq_len} tokens)"
    )
    return role


def make_plan(cfg: RunConfig, gpu_gib: float = DEFAULT_GPU_GIB) -> MemoryPlan:
    arch, source = resolve_arch(cfg)
    gpu_bytes = int(gpu_gib * GIB)
    roles = [learner_memory(cfg, arch, gpu_bytes), generator_memory(cfg, arch, gpu_bytes)]
    if cfg.use_reference:
        roles.append(reference_memory(cfg, arch))
    return MemoryPlan(arch, source, gpu_bytes, roles)


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}" if n >= GIB / 10 or n == 0 else f"{n / GIB:.3f}"


def format_plan(plan: MemoryPlan, cfg: RunConfig) -> str:
    lines = [
        f"model: {plan.arch.describe()}",
        f"  shape from {plan.arch_source}",
        f"GPU memory: {_gib(plan.gpu_bytes)} GiB per GPU",
    ]
    for role in plan.roles:
        where = "per GPU" if role.device == "GPU" else "host memory per replica, not checked against a device"
        lines.append(f"\n{role.role}: {where}")
        lines += [f"  {n}" for n in role.notes]
        width = max(len(k) for k in role.parts)
        lines += [f"    {k:<{width}}  {_gib(v):>8} GiB" for k, v in role.parts.items()]
        total = f"    {'total':<{width}}  {_gib(role.total):>8} GiB"
        if role.capacity is not None:
            total += f" of {_gib(role.capacity)}: " + ("DOES NOT FIT" if role.problem else "fits")
        lines.append(total)
    if not cfg.use_reference:
        lines.append("\nreference: not started (algorithm.kl_coef = 0)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.driver.config_io import ConfigError, load_config

    ap = argparse.ArgumentParser(prog="covrl plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="run config YAML (default: the embedded tiny job)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    ap.add_argument(
        "--gpu-mem", type=float, default=DEFAULT_GPU_GIB, metavar="GIB", help="memory per GPU (default: 80)"
    )
    args = ap.parse_args(argv)
    if not args.gpu_mem > 0:
        print(f"covrl plan: --gpu-mem must be > 0 GiB, got {args.gpu_mem}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.set)
        plan = make_plan(cfg, args.gpu_mem)
    except (ConfigError, PlanError) as e:
        print(f"covrl plan: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, cfg))
    if plan.problems:
        for p in plan.problems:
            print(f"covrl plan: does not fit: {p}", file=sys.stderr)
        return 1
    print("\nplan fits.")
    return 0
