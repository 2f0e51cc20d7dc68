"""The whole run configuration: one sub-model per role plus model, data, algorithm and schedule.

Loaded from YAML with dotted ``--set`` overrides by ``pipeline.driver.config_io``; the resolved config is written
into the run directory at start-up. Unknown keys are rejected everywhere (``Strict``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from schemas.config import PolicyLossConfig, PPOLossConfig, Resources, Strict, kl_cov_is_noop
from schemas.control_config import EntropyControlConfig
from schemas.data_config import DataConfig, TinyModelConfig
from schemas.verifier_config import VerifierConfig


class ModelConfig(Strict):
    path: str | None = Field(
        None,
        description="Local HF model directory (or hub id where a hub is reachable); None = embedded tiny model.",
    )
    tiny: TinyModelConfig = TinyModelConfig()
    trust_remote_code: bool = False


class AdvantageConfig(Strict):
    name: Literal["grpo", "rloo", "reinforce_pp"] = Field("grpo", description="Outcome-advantage estimator.")
    norm_by_std: bool = Field(True, description="GRPO: divide by the group std (False = Dr.GRPO).")
    eps: float = Field(1e-6, gt=0, description="Added to the std before dividing.")


class DynamicSamplingConfig(Strict):
    """DAPO-style dynamic sampling (the paper's setup): drop prompt groups whose verifier rewards are
    all equal (all correct or all wrong: zero advantage, no signal) and sample more prompts until the
    batch holds ``schedule.prompts_per_step`` informative groups."""

    enabled: bool = Field(False, description="Filter uninformative groups and refill the batch.")
    max_rounds: int = Field(
        3,
        ge=1,
        description="Most generation rounds per step, the first included (1 = filter only). When the cap "
        "is hit the step trains on the informative groups it has, trimmed to a multiple the learner can "
        "split.",
    )


class ISCorrectionConfig(Strict):
    """Truncated importance sampling for sampler/learner mismatch: each token's policy loss is multiplied
    by ``min(exp(old_logp_learner - sampler_logp), cap)`` (detached)."""

    enabled: bool = Field(False, description="Weight the per-token policy loss by the truncated IS ratio.")
    cap: float = Field(2.0, ge=1.0, description="Truncation C of the IS weight.")


class OverlongConfig(Strict):
    """Responses cut at generator.max_new_tokens (finish reason 'length')."""

    mode: Literal["none", "mask", "soft_penalty"] = Field(
        "none",
        description="'mask': truncated samples carry no loss; 'soft_penalty': DAPO's soft overlong "
        "punishment, 0 down to -penalty linearly over the last buffer_tokens before max_new_tokens, added to "
        "the reward.",
    )
    buffer_tokens: int = Field(4096, ge=1, description="Length of the soft-penalty ramp (DAPO: 4096).")
    penalty: float = Field(1.0, ge=0, description="Soft penalty at max_new_tokens (DAPO: 1.0).")


class AlgorithmConfig(Strict):
    advantage: AdvantageConfig = AdvantageConfig()
    policy_loss: PolicyLossConfig = Field(
        default_factory=PPOLossConfig,
        description="The policy loss; `name` selects it (ppo, clip_cov, kl_cov or an import path) and only that "
        "loss's fields are accepted.",
    )
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    is_correction: ISCorrectionConfig = ISCorrectionConfig()
    overlong: OverlongConfig = OverlongConfig()
    entropy_control: EntropyControlConfig = EntropyControlConfig()
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (paper: 0).")
    kl_coef: float = Field(
        0.0, ge=0, description="KL-to-reference loss coefficient (paper: 0). >0 starts the reference role."
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator for the reference loss.")


class GeneratorConfig(Strict):
    replicas: int = Field(1, ge=1, description="vLLM engine replicas; prompts are split across them.")
    max_restarts: int = Field(
        1, ge=0, description="Ray restarts of a dead replica (it then gets the current weights before use)."
    )
    resources: Resources = Resources(num_cpus=1.0)
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; the learner scales logits by it too."
    )
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=1)
    min_new_tokens: int = Field(
        0,
        ge=0,
        description="EOS is masked until a response has this many tokens (vLLM's min_tokens, HF's "
        "min_new_tokens); 0 = off. Benchmarks set it to max_new_tokens for fixed-length responses.",
    )
    max_model_len: int = Field(256, ge=16)
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel per replica (GPU).")
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    threads: int = Field(1, ge=1, description="Torch/OpenMP threads inside the engine.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM(...) arguments.")


class ReferenceConfig(Strict):
    replicas: int = Field(1, ge=1)
    resources: Resources = Resources(num_cpus=0.5)
    enabled: Literal["auto", "always", "never"] = Field(
        "auto", description="'auto' starts the reference only when algorithm.kl_coef > 0."
    )
    micro_batch_size: int = Field(64, ge=1)
    threads: int = Field(1, ge=1)


class EntropyProbeConfig(Strict):
    """Claim 3 where the theory applies (pipeline/core/entropy_probe.py): every ``every`` steps, from the current
    weights, one plain SGD step per learning rate on the step's batch (never applied to the run), measuring
    the exact entropy change beside -lr * Cov(log pi, A)."""

    every: int = Field(
        0, ge=0, description="Probe every N steps (0 = never). Rank 0 runs it on the whole batch."
    )
    lrs: list[float] = Field(
        [1e-3, 1e-2, 1e-1],
        min_length=1,
        description="SGD learning rates probed (each from the same weights): small ones stay in the law's "
        "first-order regime, larger ones show where it ends.",
    )

    @model_validator(mode="after")
    def _positive(self) -> EntropyProbeConfig:
        if any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs must all be > 0, got {self.lrs}")
        return self


class LearnerConfig(Strict):
    ranks: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks (one Ray actor each).")
    resources: Resources = Resources(num_cpus=1.0)
    zero_stage: int = Field(
        2,
        ge=1,
        le=3,
        description="DeepSpeed ZeRO stage (1-3; ZeRO skips an update whose gradient norm is NaN/inf).",
    )
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up, in optimizer updates.")
    grad_clip: float = Field(1.0, gt=0)
    fused_optimizer: bool = Field(
        True,
        description="On CPU, torch's fused AdamW kernel (one pass over the weights per update instead of one per "
        "elementwise op; the same update). false = torch's per-op AdamW. On GPU DeepSpeed's own fused Adam is "
        "used either way. Measured gain: bench/README.md.",
    )
    mini_batches: int = Field(
        4, ge=1, description="Optimizer updates per rollout batch per epoch (KL-Cov needs > 1)."
    )
    epochs: int = Field(1, ge=1, description="PPO epochs over each rollout batch.")
    micro_batch_size: int = Field(
        64, ge=1, description="Sequences per forward/backward (gradient accumulation)."
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Dynamic batching: when set, each rank's rows are sorted by length and cut into micro-batches "
        "of at most this many padded tokens (rows x longest row) instead of micro_batch_size rows, so "
        "variable-length responses waste little compute on padding. With the default selection_scope "
        "(mini_batch) the update is the same either way.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each transformer block's input during the loss forward and recompute the block in "
        "backward (Hugging Face's non-reentrant checkpointing): activation memory drops from every block's "
        "intermediates to one block's, for about one extra forward of compute. Same update either way. "
        "`covrl plan` shows the memory with and without it (docs/deploy.md).",
    )
    selection_scope: Literal["mini_batch", "micro_batch"] = Field(
        "mini_batch",
        description="Where Clip-Cov/KL-Cov pick tokens: over the whole optimizer mini-batch across micro-batches "
        "and ranks (covrl, split-invariant), or per micro-batch (reference code behaviour).",
    )
    selection_logprobs: Literal["current", "step_start"] = Field(
        "current",
        description="Log-probs that rank tokens for mini_batch-scope selection. 'current' (default, the paper's "
        "algorithm): the current policy's, taken from the loss forward itself when each rank's share of a "
        "mini-batch fits one micro-batch, else from one lean no-grad pass per later mini-batch. 'step_start': an "
        "opt-in approximation that ranks by the log-probs of the policy that started the step (KL-Cov then needs "
        "no extra pass; Clip-Cov still needs the current ratio to skip PPO-clipped tokens). Cost and effect: "
        "bench/README.md.",
    )
    threads: int = Field(1, ge=1)
    threads_while_generating: int | None = Field(
        None,
        ge=1,
        description="One-step-async on shared CPU cores: threads the learner keeps while a generator on its "
        "node is generating (it takes the rest back when generation ends; actors/core_share.py). "
        "None = always `threads`. No effect in sync mode, where the roles never overlap.",
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    start_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a starting learner waits for a JIT-extension build lock held elsewhere "
        "(DeepSpeed's CPU communication op: another process compiling it, or a lock left by a start killed "
        "mid-build); it then fails naming the lock file and how to clear it. scripts/setup.sh builds the op "
        "ahead of time, so a normal start takes the lock only briefly.",
    )
    max_bad_steps: int = Field(3, ge=1, description="Stop after this many consecutive non-finite updates.")
    measure_entropy_change_every: int = Field(
        1,
        ge=0,
        description="Every N steps, one extra forward measures the entropy after the update (0 = never).",
    )
    entropy_probe: EntropyProbeConfig = EntropyProbeConfig()

    @model_validator(mode="after")
    def _probe_needs_whole_weights(self) -> LearnerConfig:
        if self.entropy_probe.every and self.zero_stage == 3:
            raise ValueError(
                "learner.entropy_probe needs the whole weights on rank 0: use zero_stage <= 2 or set "
                "entropy_probe.every = 0"
            )
        return self


class WandbConfig(Strict):
    """Weights & Biases as a third metrics sink (beside metrics.jsonl and TensorBoard); needs the optional
    ``wandb`` extra (``pip install 'covrl[wandb]'``)."""

    enabled: bool = Field(False, description="Log every step's metrics to a W&B run.")
    project: str = Field("covrl", min_length=1, description="W&B project.")
    name: str | None = Field(None, description="W&B run name; None = the run directory's name.")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="'offline' writes the W&B run under dir with no network (upload later with `wandb sync`); "
        "'online' streams it (needs a W&B login on the metrics actor's node).",
    )
    dir: str | None = Field(
        None, description="Where W&B writes its 'wandb/' folder; None = the run directory."
    )


class MetricsConfig(Strict):
    resources: Resources = Resources(num_cpus=0.0)
    tensorboard: bool = True
    wandb: WandbConfig = WandbConfig()
    collapse_fraction: float = Field(
        0.3, gt=0, lt=1, description="Warn when entropy < this fraction of its initial value."
    )
    surge_factor: float = Field(
        2.0, gt=1, description="Warn when entropy > this multiple of its initial value."
    )
    inspector_every: int = Field(
        10, ge=0, description="Save the top tokens by covariance every N steps (0 = never)."
    )
    inspector_top_k: int = Field(20, ge=1)


class ScheduleConfig(Strict):
    steps: int = Field(60, ge=1, description="RL steps (rollout batches).")
    prompts_per_step: int = Field(32, ge=1)
    group_size: int = Field(8, ge=1, description="Responses sampled per prompt (GRPO n).")
    eval_every: int = Field(
        10, ge=0, description="Held-out evaluation every N steps (0 = only start and end)."
    )
    eval_prompts: int = Field(256, ge=1)
    eval_samples: int = Field(
        4,
        ge=1,
        description="Samples n per eval prompt: unbiased pass@k (Chen et al. 2021) is logged for k in 1, 4, 16, "
        "64, 256 up to n, and for k = n.",
    )
    eval_temperature: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(20, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    max_role_restarts: int = Field(
        2,
        ge=0,
        description="Automatic restarts of every role from the latest checkpoint after a learner/reference death.",
    )
    mode: Literal["sync", "async"] = Field(
        "sync", description="'async': generation of step t+1 overlaps learning of step t."
    )
    seed: int = 0


class RayConfig(Strict):
    address: str | None = Field(
        None, description="Existing cluster ('auto' inside `ray job submit`); None starts a local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None = Ray's default).")
    namespace: str = "covrl"
    worker_niceness: int | None = Field(
        None,
        ge=-20,
        le=19,
        description="Niceness of the role processes of a local cluster. None = the driver's own: Ray's "
        "default (15) makes every role yield to any other process, so on a shared machine (a laptop, CI) "
        "covrl ran at the lowest priority of anything there (bench/README.md).",
    )


class WeightSyncConfig(Strict):
    """How new policy weights reach the generators after each update (docs/architecture.md)."""

    method: Literal["object_store", "collective"] = Field(
        "object_store",
        description="'object_store': learner rank 0 puts one fp32 state dict into Ray's object store and every "
        "replica reloads it (simple, any topology, restarts trivially). 'collective': vLLM's weight-transfer "
        "API broadcasts the weights from learner rank 0 into every generator worker over a process group "
        "(NCCL on GPUs, gloo on CPU), bucketed, without the object store; use it at scale.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Collective transport: auto = nccl when the learner has a GPU, else gloo."
    )
    wire_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype on the wire: auto = bfloat16 on GPUs (what vLLM serves), float32 on CPU."
    )
    bucket_mb: float = Field(
        256.0, gt=0, description="Collective: parameters are packed into flat buckets of about this size."
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="Collective: a rendezvous or broadcast that takes longer fails (and is rebuilt).",
    )


class RunConfig(Strict):
    name: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$")
    run_dir: str = Field("runs/{name}", description="Output directory; '{name}' is replaced by the run name.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    generator: GeneratorConfig = GeneratorConfig()
    verifier: VerifierConfig = VerifierConfig()
    reference: ReferenceConfig = ReferenceConfig()
    learner: LearnerConfig = LearnerConfig()
    metrics: MetricsConfig = MetricsConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        n = self.schedule.prompts_per_step * self.schedule.group_size
        split = self.learner.mini_batches * self.learner.ranks
        if n % split:
            raise ValueError(
                f"schedule.prompts_per_step * schedule.group_size = {n} must be divisible by "
                f"learner.mini_batches * learner.ranks = {split}"
            )
        overlong = self.algorithm.overlong
        if overlong.mode == "soft_penalty" and overlong.buffer_tokens > self.generator.max_new_tokens:
            raise ValueError(
                f"algorithm.overlong.buffer_tokens = {overlong.buffer_tokens} must be <= "
                f"generator.max_new_tokens = {self.generator.max_new_tokens} for the soft overlong penalty"
            )
        ec = self.algorithm.entropy_control
        if ec.enabled:
            try:
                ec.knob_field(self.algorithm.policy_loss.name)
            except ValueError as e:
                raise ValueError(f"algorithm.entropy_control: {e}") from None
        if self.schedule.mode == "async" and self.algorithm.dynamic_sampling.enabled:
            raise ValueError(
                "schedule.mode=async with algorithm.dynamic_sampling.enabled is not supported yet: "
                "use one of them"
            )
        twg = self.learner.threads_while_generating
        if twg is not None and twg > self.learner.threads:
            raise ValueError(
                f"learner.threads_while_generating = {twg} must be <= learner.threads = {self.learner.threads} "
                "(it is how many threads the learner keeps while it lends cores to generation)"
            )
        if self.reference.enabled == "never" and self.algorithm.kl_coef > 0:
            raise ValueError(
                "algorithm.kl_coef > 0 needs the reference role: set reference.enabled to 'auto'"
            )
        return self

    @property
    def use_reference(self) -> bool:
        return self.reference.enabled == "always" or (
            self.reference.enabled == "auto" and self.algorithm.kl_coef > 0
        )

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what the user wants."""
        out = []
        loss = self.algorithm.policy_loss
        noop = kl_cov_is_noop(self.learner.mini_batches, self.learner.epochs)
        if loss.name == "kl_cov" and noop:
            out.append(noop)
        if loss.name == "kl_cov" and loss.kl_cov_beta < 1:
            out.append(
                f"kl_cov_beta={loss.kl_cov_beta}: the paper and its scripts use 1 (verl's 0.1 default is a trap)"
            )
        twg = self.learner.threads_while_generating
        if (
            self.schedule.mode == "async"
            and twg is not None
            and twg + self.generator.threads > self.learner.threads
        ):
            out.append(
                f"learner.threads_while_generating={twg} + generator.threads={self.generator.threads} > "
                f"learner.threads={self.learner.threads}: where the two roles share cores they are oversubscribed "
                "while generating, which is slower than sync mode (bench/README.md); lend as many "
                "threads as the generator uses"
            )
        return out

    def resolved_run_dir(self) -> str:
        return self.run_dir.replace("{name}", self.name)
