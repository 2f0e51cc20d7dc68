"""The built-in synthetic tasks behind one interface: what the data loader, the tiny-model bootstrap and the
verifier routing need from a task, looked up by ``data.synthetic.task``.

Tasks: ``addition`` (``pipeline.data.addition``, the default) and ``countdown`` (``pipeline.data.countdown``); docs/tasks.md
says why each exists and how they were calibrated. Adding a task = a module with the functions below, a
config class in ``schemas/data_config.py`` and one ``TaskSpec`` entry here.

Routing: when the synthetic task is in use (``data.train_files`` empty) its rows' ``data_source`` goes to
the task's own verifier unless ``verifier.routes`` names that source (``verifier_config_for_run``), so
selecting the task is enough to score it correctly; with files, verl's math data sources go to ``math``
(``pipeline.data.known_sources``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.data import addition, countdown
from pipeline.data.known_sources import known_source_routes
from schemas.data_config import DataConfig, SyntheticTaskConfig, TaskConfig
from schemas.verifier_config import VerifierConfig, VerifierSpec


@dataclass(frozen=True)
class TaskSpec:
    """What a built-in task provides. Splits are 'train' and 'eval'; every function is pure."""

    name: str
    verifier: str  # registered verifier that scores this task's rows
    symbols: tuple[str, ...]  # the character tokenizer's alphabet
    make_rows: Callable[[TaskConfig, str], list[dict]]  # {prompt, ground_truth, data_source, id}
    make_sft_texts: Callable[[TaskConfig, str], tuple[list[str], list[str]]]  # one reference per problem
    reference_texts: Callable[[TaskConfig, str], tuple[list[str], list[str], list[int]]]  # every solution
    score_response: Callable[[str, str], tuple[float, str | None]]
    max_response_chars: Callable[[TaskConfig], int]
    describe: Callable[[TaskConfig], str]
    cache_identity: Callable[[TaskConfig], dict]  # the settings the built model depends on
    check: Callable[[TaskConfig], None]  # raises ValueError naming the field when the settings cannot work


def _addition_references(cfg: SyntheticTaskConfig, split: str) -> tuple[list[str], list[str], list[int]]:
    prompts, responses = addition.make_sft_texts(cfg, split)
    return prompts, responses, list(range(len(prompts)))


def _addition_identity(cfg: SyntheticTaskConfig) -> dict:
    # Without the 'task' tag: exactly the fields hashed before tasks were selectable, so the cached
    # default model keeps its key.
    return cfg.model_dump(exclude={"task"})


TASKS: dict[str, TaskSpec] = {
    "addition": TaskSpec(
        name="addition",
        verifier="arithmetic",
        symbols=addition.SYMBOLS,
        make_rows=addition.make_rows,
        make_sft_texts=addition.make_sft_texts,
        reference_texts=_addition_references,
        score_response=addition.score_response,
        max_response_chars=lambda cfg: addition.max_response_chars(cfg.digits),
        describe=lambda cfg: f"{cfg.digits}-digit addition",
        cache_identity=_addition_identity,
        check=lambda cfg: None,  # the schema checks the split sizes itself
    ),
    "countdown": TaskSpec(
        name="countdown",
        verifier="countdown",
        symbols=countdown.SYMBOLS,
        make_rows=countdown.make_rows,
        make_sft_texts=countdown.make_sft_texts,
        reference_texts=countdown.reference_texts,
        score_response=countdown.score_response,
        max_response_chars=countdown.max_response_chars,
        describe=lambda cfg: (
            f"countdown, {cfg.numbers} numbers in {cfg.min_number}..{cfg.max_number}, "
            f"targets {cfg.min_target}..{cfg.max_target}"
        ),
        cache_identity=lambda cfg: cfg.model_dump(),
        check=countdown.check_sizes,
    ),
}


def task_spec(cfg: TaskConfig | str) -> TaskSpec:
    """The spec of a task config (or task name)."""
    name = cfg if isinstance(cfg, str) else cfg.task
    if name not in TASKS:
        raise ValueError(f"data.synthetic.task: unknown task {name!r}; built in: {', '.join(TASKS)}")
    return TASKS[name]


def make_rows(cfg: TaskConfig, split: str) -> list[dict]:
    """Rows of one split of the configured task."""
    return task_spec(cfg).make_rows(cfg, split)


def describe(cfg: TaskConfig) -> str:
    """A short human description, e.g. '3-digit addition'."""
    return task_spec(cfg).describe(cfg)


def task_routes(data: DataConfig) -> dict[str, VerifierSpec]:
    """data_source -> verifier of the built-in task, when the run uses it (no train files), else {}."""
    if data.train_files:
        return {}
    spec = task_spec(data.synthetic)
    return {data.synthetic.data_source: VerifierSpec(name=spec.verifier)}


def builtin_routes(data: DataConfig) -> dict[str, VerifierSpec]:
    """The routes covrl adds by itself: the built-in task's (no train files) or verl's math sources (files)."""
    return task_routes(data) | known_source_routes(data)


def verifier_config_for_run(verifier: VerifierConfig, data: DataConfig) -> VerifierConfig:
    """``verifier`` with the built-in routes added; a route the user wrote for the same source wins."""
    routes = builtin_routes(data) | dict(verifier.routes)
    if routes == dict(verifier.routes):
        return verifier
    return VerifierConfig.model_validate(verifier.model_dump() | {"routes": routes})
