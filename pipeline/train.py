"""``python -m pipeline.train [--config FILE] [--set key=value ...] [--resume RUN_DIR]``

With no arguments: the embedded default job (tiny model, synthetic task, all five roles on a local
Ray). Every input is checked before any actor starts (config, model directory, tokenizer/model match,
data); a role that fails to start is named, and every actor and placement group is released on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.driver.config_io import dump_config, load_config
from schemas.run_config import RunConfig

#: Failed health checks before a local cluster's GCS declares its only node dead: 12x Ray's default of 5,
#: so a raylet stalled by the machine for minutes is waited for (a 180 s stall measured in
#: docs/reliability.md). A raylet that really dies still ends the run at once: the driver exits with it.
LOCAL_HEALTH_CHECK_FAILURES = 60


class InputError(ValueError):
    """Bad input found before start-up (model, tokenizer, data); the message says what to fix."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="covrl train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML run config (default: the embedded tiny job, configs/default.yaml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field by dotted path"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest complete checkpoint")
    p.add_argument("--verbose", action="store_true", help="forward every actor's logs to this console")
    return p.parse_args(argv)


def check_task(cfg: RunConfig) -> None:
    """Settings of the built-in task that the schema cannot check alone (e.g. more problems asked for
    than the countdown settings allow); only when the run uses it (no train files)."""
    from pipeline.data.tasks import task_spec

    if cfg.data.train_files:
        return
    try:
        task_spec(cfg.data.synthetic).check(cfg.data.synthetic)
    except ValueError as e:
        raise InputError(str(e)) from None


def resolve_model(cfg: RunConfig) -> str:
    if cfg.model.path is None:
        from pipeline.data.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(cfg.model.tiny, cfg.data.synthetic, progress=True))
    path = Path(cfg.model.path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"model.path {path}: no config.json — not a Hugging Face model directory")
        return str(path.resolve())
    if (
        os.environ.get("HF_HUB_OFFLINE") == "1"
        or "/" not in cfg.model.path
        or cfg.model.path.startswith((".", "/", "~"))
    ):
        raise InputError(f"model.path {cfg.model.path}: no such directory")
    return cfg.model.path  # a hub id, where a hub is reachable


def load_tokenizer(model_path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        conf = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load tokenizer/config from {model_path}: {e}") from None
    vocab = getattr(conf, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise InputError(
            f"tokenizer/model mismatch in {model_path}: the tokenizer has {len(tok)} tokens but the model's "
            f"vocab_size is {vocab}; use the tokenizer that was trained with this model"
        )
    return tok


def new_run_dir(cfg: RunConfig) -> Path:
    base = cfg.resolved_run_dir().replace("{timestamp}", time.strftime("%Y%m%d-%H%M%S"))
    path = Path(base)
    suffix = 1
    while path.exists() and any(path.iterdir()):
        path = Path(f"{base}-{suffix}")
        suffix += 1
    return path


@dataclass
class Prepared:
    """Everything a run needs, checked before Ray or any actor starts."""

    cfg: RunConfig
    run_dir: Path
    model_path: str
    tokenizer: Any
    stream: Any  # pipeline.data.datasets.PromptStream, positioned at the resume point
    eval_rows: list[dict[str, Any]]
    resume: tuple[Path, Any] | None  # (checkpoint dir, DriverState) when resuming


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything that can fail on bad input, before Ray or any actor starts."""
    from pipeline.driver import checkpoint as ckpt

    resume_state = None
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise InputError(f"--resume {run_dir}: no config.yaml there — not a covrl run directory")
        cfg = load_config(run_dir / "config.yaml", args.set)
        latest = ckpt.latest(run_dir)
        if latest is None:
            raise InputError(f"--resume {run_dir}: no complete checkpoint to resume from")
        resume_state = (latest, ckpt.load_state(latest))
        ckpt.clean_partials(run_dir)
    else:
        cfg = load_config(args.config, args.set)
        run_dir = new_run_dir(cfg)
    # after the config: its errors must not wait for torch and Ray to import
    from actors.metrics import check_wandb
    from pipeline.core.losses import get_policy_loss
    from pipeline.data.datasets import PromptStream, load_split
    from pipeline.data.tasks import verifier_config_for_run
    from pipeline.data.verifiers.base import VerifierLoadError, check_verifiers
    from pipeline.data.verifiers.functions import check_columns

    check_task(cfg)
    try:
        check_wandb(cfg.metrics.wandb)
    except ValueError as err:
        raise InputError(str(err)) from None
    try:
        check_verifiers(verifier_config_for_run(cfg.verifier, cfg.data))  # the task's route included
    except VerifierLoadError as err:
        raise InputError(str(err)) from None
    try:
        get_policy_loss(cfg.algorithm.policy_loss.name)  # an import-path loss must import here already
    except ValueError as err:
        raise InputError(f"algorithm.policy_loss.name: {err}") from None
    model_path = resolve_model(cfg)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    train_rows, train_report = load_split(cfg.data, "train", tokenizer=tokenizer)
    eval_rows, eval_report = (
        load_split(cfg.data, "eval", tokenizer=tokenizer)
        if cfg.data.eval_files or not cfg.data.train_files
        else ([], None)
    )
    for i, row in enumerate(train_rows):
        row["index"] = i
    for i, row in enumerate(eval_rows):
        row["index"] = i
    print(f"[covrl] train data: {train_report.summary()}", flush=True)
    if eval_report is not None:
        print(f"[covrl] eval data: {eval_report.summary()}", flush=True)
    print_routes(cfg, train_rows)
    try:
        check_columns(verifier_config_for_run(cfg.verifier, cfg.data), train_rows, "train")
        check_columns(verifier_config_for_run(cfg.verifier, cfg.data), eval_rows, "eval")
    except VerifierLoadError as err:
        raise InputError(str(err)) from None
    stream = PromptStream.from_config(train_rows, cfg.data)
    if resume_state is not None:
        stream.load_state_dict(resume_state[1].data_state)
    return Prepared(cfg, run_dir, model_path, tokenizer, stream, eval_rows, resume_state)


def print_routes(cfg: RunConfig, rows: list[dict[str, Any]]) -> None:
    """Which verifier scores each data source of the training rows, and which setting chose it."""
    from collections import Counter

    from pipeline.data.tasks import builtin_routes

    builtin = builtin_routes(cfg.data)
    for source, n in sorted(Counter(r["data_source"] for r in rows).items()):
        if source in cfg.verifier.routes:
            spec, why = cfg.verifier.routes[source], "verifier.routes"
        elif source in builtin:
            spec, why = builtin[source], "built in"
        else:
            spec, why = cfg.verifier.default, "verifier.default"
        print(
            f"[covrl] verifier: data_source {source!r} ({n} train rows) -> {spec.name!r} ({why})", flush=True
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    prep = prepare(args)  # config, model and data checks first: a bad input exits before Ray and torch load

    import ray

    from pipeline.analysis.summary import summarize_run
    from pipeline.driver.roles import RoleFailure

    cfg, run_dir, stream, resume = prep.cfg, prep.run_dir, prep.stream, prep.resume
    for w in cfg.warnings():
        print(f"[covrl] WARNING: {w}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    _link_latest(run_dir)
    print(f"[covrl] run dir: {run_dir}", flush=True)

    started_ray = not ray.is_initialized()
    if started_ray:
        if cfg.ray.address is None:  # the raylet reads it when it starts its workers
            nice = cfg.ray.worker_niceness
            os.environ["RAY_worker_niceness"] = str(os.nice(0) if nice is None else nice)
            # A local cluster is one node: once its GCS declares that node dead (Ray's default: a raylet
            # silent for about a minute, which a loaded laptop or CI box can cause) nothing can host the
            # run's roles again. Wait it out instead (docs/reliability.md); the user's own setting wins.
            os.environ.setdefault("RAY_health_check_failure_threshold", str(LOCAL_HEALTH_CHECK_FAILURES))
        ray.init(
            address=cfg.ray.address,
            num_cpus=cfg.ray.num_cpus if cfg.ray.address is None else None,
            namespace=cfg.ray.namespace,
            include_dashboard=False,
            log_to_driver=args.verbose,
        )
    t0 = time.perf_counter()
    initial_data_state = stream.state_dict()
    attempt = 0
    try:
        while True:
            try:
                _attempt(prep, resume)
                break
            except RoleFailure as failure:
                attempt += 1
                resume = _restart_point(run_dir, stream, initial_data_state)
                where = f"checkpoint {resume[0].name}" if resume[0] else "the start (no checkpoint yet)"
                if attempt > cfg.schedule.max_role_restarts:
                    raise RoleFailure(
                        failure.role,
                        f"{failure} — gave up after {cfg.schedule.max_role_restarts} restarts; "
                        f"resume later with --resume {run_dir} (from {where})",
                    ) from None
                print(
                    f"[covrl] {failure}; restarting every role from {where} "
                    f"(attempt {attempt}/{cfg.schedule.max_role_restarts})",
                    flush=True,
                )
        summary = summarize_run(run_dir, wall_s=time.perf_counter() - t0)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def _restart_point(run_dir: Path, stream: Any, initial_data_state: dict) -> tuple[Path | None, Any]:
    """Where an automatic restart resumes: the latest complete checkpoint, or the very start."""
    from pipeline.driver import checkpoint as ckpt

    ckpt.clean_partials(run_dir)
    latest = ckpt.latest(run_dir)
    if latest is None:
        stream.load_state_dict(initial_data_state)
        return (None, ckpt.DriverState(step=0, policy_version=0, data_state=initial_data_state, rng_seed=0))
    state = ckpt.load_state(latest)
    stream.load_state_dict(state.data_state)
    return latest, state


def _attempt(prep: Prepared, resume: tuple[Path | None, Any] | None) -> None:
    """Start every role, (re)load the checkpoint if resuming, train to the end; always release roles."""
    from pipeline.driver.roles import placement_report, start_roles, stop_roles
    from pipeline.driver.rollout import DataSource
    from pipeline.driver.trainer import Trainer

    cfg, run_dir = prep.cfg, prep.run_dir
    roles = None
    try:
        start_step = resume[1].step if resume else 0
        roles = start_roles(
            cfg, prep.model_path, str(run_dir), resume_after_step=start_step if resume else None
        )
        (run_dir / "placement.json").write_text(json.dumps(placement_report(roles), indent=1))
        data = DataSource(prep.stream, prep.eval_rows, prep.tokenizer)
        trainer = Trainer(cfg, str(run_dir), roles, data, start_step=start_step)
        if resume and resume[0] is not None:
            ckpt_dir = str(resume[0] / "learner")
            versions = roles.learners.call(lambda lr: lr.load_checkpoint.remote(ckpt_dir, "ckpt"))
            trainer.version = versions[0]
            if trainer.controller is not None and "entropy_control" in resume[1].extra:
                trainer.controller.load_state_dict(resume[1].extra["entropy_control"])
            trainer.weights.sync(trainer.version)
            print(
                f"[covrl] resumed from {resume[0].name} (step {start_step}, weights v{versions[0]})",
                flush=True,
            )
        trainer.run()
    finally:
        if roles is not None:
            stop_roles(roles)


def _link_latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(run_dir.name)
    except OSError:
        pass


# Errors that end a run with their message and an exit code instead of a traceback: (module, class, code);
# 2 = bad input, 1 = the run failed. Looked up in sys.modules, not imported: an error class whose module was
# never loaded cannot have been raised, and importing the role and trainer modules (torch, Ray: seconds) just
# to name their errors would delay a config error's message by as much.
RUN_ERRORS = (
    ("pipeline.driver.config_io", "ConfigError", 2),
    ("pipeline.train", "InputError", 2),
    ("pipeline.data.datasets", "DataError", 2),
    ("pipeline.driver.checkpoint", "CheckpointError", 1),
    ("pipeline.driver.roles", "RoleStartError", 1),
    ("pipeline.driver.roles", "RoleFailure", 1),
    ("pipeline.driver.trainer", "TrainingDiverged", 1),
)


def exit_code(error: BaseException) -> int | None:
    """The exit code of a run-ending error of RUN_ERRORS, or None for anything else (a bug: re-raised)."""
    for module, name, code in RUN_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return code
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    try:
        summary = run(args)
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"[covrl] error: {e}", file=sys.stderr, flush=True)
        return code
    from pipeline.analysis.summary import print_summary

    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
