"""Configuration of the prompt data, the built-in synthetic tasks and the embedded tiny model.

Why separate from ``schemas.config``: these models are owned by the data/bootstrap code
(``pipeline.data.datasets``, ``pipeline.data.tasks``, ``pipeline.data.tiny_model``) and are imported by the run config.
All are ``Strict`` (unknown keys rejected, frozen) so a typo in YAML fails at start-up.

The built-in task is picked by ``data.synthetic.task`` (``addition``, the default, or ``countdown``); each
task has its own fields, so a field of the other task is rejected as an unknown key (docs/tasks.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from schemas.config import Strict


class SyntheticTaskConfig(Strict):
    """Built-in task ``addition``: n-digit addition with a digit-by-digit carry chain (``pipeline.data.addition``)."""

    task: Literal["addition"] = Field(
        "addition", description="Which built-in task ('addition' or 'countdown')."
    )
    digits: int = Field(3, ge=1, le=6, description="Digits per operand (operands have no leading zeros).")
    n_train: int = Field(
        50_000, ge=1, description="Problems in the training split (SFT warm start and RL prompts)."
    )
    n_eval: int = Field(1_024, ge=1, description="Problems in the held-out split (disjoint from train).")
    seed: int = Field(0, description="Seed of the split generator; same seed -> same splits.")
    data_source: str = Field("arithmetic", min_length=1, description="data_source tag on every row.")

    @model_validator(mode="after")
    def _fits(self) -> SyntheticTaskConfig:
        lo = 10 ** (self.digits - 1) if self.digits > 1 else 0
        space = (10**self.digits - lo) ** 2
        if self.n_train + self.n_eval > space:
            raise ValueError(
                f"n_train + n_eval = {self.n_train + self.n_eval} exceeds the {space} distinct "
                f"{self.digits}-digit problems: lower n_train/n_eval or raise digits"
            )
        return self


class CountdownTaskConfig(Strict):
    """Built-in task ``countdown``: reach a target from small numbers with + - *, each number used once,
    the steps written out (``pipeline.data.countdown``). The defaults are the calibrated ones (docs/tasks.md)."""

    task: Literal["countdown"] = Field(
        "countdown", description="Which built-in task ('addition' or 'countdown')."
    )
    numbers: int = Field(
        3, ge=2, le=4, description="Numbers per problem (4 is much harder: more paths, longer)."
    )
    min_number: int = Field(1, ge=1, description="Smallest given number.")
    max_number: int = Field(20, ge=1, le=30, description="Largest given number.")
    min_target: int = Field(10, ge=0, description="Smallest target.")
    max_target: int = Field(99, ge=1, le=9999, description="Largest target.")
    n_train: int | None = Field(
        None, ge=1, description="Problems in the training split; None = every problem not held out."
    )
    n_eval: int = Field(256, ge=1, description="Problems in the held-out split (disjoint from train).")
    seed: int = Field(0, description="Seed of the split, the shown number order and the SFT solution choice.")
    data_source: str = Field("countdown", min_length=1, description="data_source tag on every row.")

    @model_validator(mode="after")
    def _ranges(self) -> CountdownTaskConfig:
        if self.min_number > self.max_number:
            raise ValueError(f"min_number = {self.min_number} must be <= max_number = {self.max_number}")
        if self.min_target > self.max_target:
            raise ValueError(f"min_target = {self.min_target} must be <= max_target = {self.max_target}")
        return self


def _task_name(value: Any) -> str:
    """The ``task`` tag of a raw or built task config; absent means 'addition' (configs written before
    there was a choice keep working)."""
    if isinstance(value, dict):
        return value.get("task", "addition")
    return getattr(value, "task", "addition")


TaskConfig = Annotated[
    Annotated[SyntheticTaskConfig, Tag("addition")] | Annotated[CountdownTaskConfig, Tag("countdown")],
    Discriminator(
        _task_name,
        custom_error_type="unknown_task",
        custom_error_message="task must be 'addition' or 'countdown'",
    ),
]


class TinyModelConfig(Strict):
    """Architecture and supervised warm start of the embedded tiny Llama (measured warm starts: docs/tasks.md).

    The warm start stops by evaluation: at the first held-out pass@1 (temperature 1) that reaches
    ``stop_at``, which must lie inside ``[target_low, target_high]``; the RL run then has room to improve.
    """

    hidden_size: int = Field(192, ge=8, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads (also KV heads).")
    intermediate_size: int = Field(512, ge=8, description="SwiGLU MLP width.")
    max_position_embeddings: int = Field(
        256, ge=64, description="Longest sequence the model (and vLLM's max_model_len) may use."
    )
    sft_batch_size: int = Field(128, ge=1, description="Sequences per SFT step.")
    sft_lr: float = Field(2e-3, gt=0, description="AdamW peak learning rate of the warm start.")
    sft_warmup_steps: int = Field(50, ge=0, description="Linear LR warm-up steps.")
    max_sft_steps: int = Field(600, ge=1, description="Hard cap on SFT steps (the stop is by evaluation).")
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="Optional wall-clock cap of the warm start (fails beyond it; not in the cache key). Off by "
        "default: the step cap bounds the build, and a cut by time would make the outcome depend on machine load.",
    )
    eval_every: int = Field(5, ge=1, description="Held-out evaluation every N SFT steps.")
    eval_prompts: int = Field(
        256, ge=1, description="Held-out prompts per stopping evaluation (1 sample each)."
    )
    sampled_eval_margin: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Sample (generate) only once the cheap teacher-forced expected pass@1 reaches stop_at minus "
        "this; the stop itself needs a sampled pass@1 >= stop_at.",
    )
    final_eval_prompts: int = Field(
        1_024, ge=1, description="Held-out prompts in the reported final evaluation."
    )
    target_low: float = Field(0.2, ge=0, le=1, description="Lower edge of the accepted pass@1 band at T=1.")
    target_high: float = Field(0.6, ge=0, le=1, description="Upper edge of the accepted pass@1 band at T=1.")
    stop_at: float = Field(0.3, ge=0, le=1, description="Stop at the first evaluation with pass@1 >= this.")
    threads: int = Field(2, ge=1, description="torch threads during the build.")
    seed: int = Field(0, description="Seed of initialisation, batch order and sampling.")

    @model_validator(mode="after")
    def _band(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if not self.target_low <= self.stop_at <= self.target_high:
            raise ValueError("stop_at must lie inside [target_low, target_high]")
        return self


class DataConfig(Strict):
    """Where prompts come from and how rows map to (prompt, ground truth, data source).

    A row's ``extra_info`` (verl's name) and ``extra`` objects, merged, reach its verifier as the sample's
    ``extras`` dict (e.g. a code task's test cases); any other value there is a malformed row."""

    train_files: list[str] = Field(
        default_factory=list,
        description="JSONL/Parquet files (globs allowed); [] = the built-in synthetic task.",
    )
    eval_files: list[str] = Field(
        default_factory=list,
        description="Held-out files; [] = the synthetic held-out split (synthetic task) or no held-out eval.",
    )
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' picks by extension (.jsonl/.json/.ndjson, .parquet/.pq)."
    )
    prompt_key: str = Field(
        "prompt", min_length=1, description="Prompt field: a string or a list of chat messages."
    )
    ground_truth_key: str | None = Field(
        None,
        description="Dotted path of the ground truth (e.g. 'reward_model.ground_truth'); None tries "
        "'ground_truth' then 'reward_model.ground_truth'.",
    )
    data_source_key: str = Field(
        "data_source",
        min_length=1,
        description="Field naming the verifier domain; missing -> default_data_source.",
    )
    default_data_source: str = Field("unknown", min_length=1, description="data_source of rows without one.")
    wrap_plain_prompts: bool = Field(
        False, description="Treat a plain-string prompt as one user message so the chat template applies."
    )
    max_prompt_tokens: int | None = Field(
        512, ge=1, description="Drop (and count) prompts longer than this many tokens; None = no limit."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="Malformed row: 'error' stops naming file/row/field; 'skip' drops it and counts it.",
    )
    shuffle: bool = Field(
        True, description="Shuffle prompts each epoch (permutation seeded by seed + epoch)."
    )
    seed: int = Field(0, description="Seed of the per-epoch shuffle.")
    synthetic: TaskConfig = Field(
        default_factory=SyntheticTaskConfig,
        description="The built-in task used when train_files is empty; 'task' picks it (addition, countdown).",
    )
