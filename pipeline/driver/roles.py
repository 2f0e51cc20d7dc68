"""Start the five roles as Ray actors, each placed by its own resource spec; stop them all.

Reads like the topology: generators x G, verifiers x V, reference x R (only when needed), learner
ranks x L (one placement group, so ranks are gang-scheduled), one named metrics actor. Each role is a
``RoleGroup``: the same start / call / survive-a-dead-member shape for every role. The verifiers
get the built-in task's route added (``pipeline.data.tasks.verifier_config_for_run``). A role that
fails to start raises RoleStartError naming the role and the reason, after every actor and placement
group created so far has been released.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.generator import Generator
from actors.learner import Learner
from actors.metrics import Metrics
from actors.reference import Reference
from actors.verifier import VerifierWorker
from pipeline.data.tasks import verifier_config_for_run
from schemas.config import Resources
from schemas.run_config import RunConfig


class RoleStartError(RuntimeError):
    """A role could not start; the message names the role and why."""


class RoleFailure(RuntimeError):
    """A role failed in a way the step cannot absorb; names the role and the cause."""

    def __init__(self, role: str, detail: str) -> None:
        super().__init__(f"{role} failed: {detail}")
        self.role = role


@dataclass
class RoleGroup:
    """The N actors of one role, one shape for every role: call all live members or one, get results with a
    dead member named (``RoleFailure``), leave a dead member out and take it back once it answers again
    (Ray restarts actors up to their ``max_restarts``)."""

    role: str
    actors: list[Any] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)
    failures: int = 0  # members found dead so far

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, i: int) -> Any:
        return self.actors[i]

    def __iter__(self):
        return iter(self.actors)

    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.dead]

    def map(self, fn: Callable[[Any], Any]) -> list[Any]:
        """``fn(actor)`` (which returns an object ref) on every live member, launched at once."""
        return [fn(self.actors[i]) for i in self.live()]

    def get(self, refs: Any, *, timeout: float | None = None) -> Any:
        """``ray.get`` that turns a dead member into ``RoleFailure`` naming the role."""
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.RayActorError as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RoleFailure(self.role, detail) from None

    def call(self, fn: Callable[[Any], Any]) -> list[Any]:
        """``fn`` on every live member, then one get."""
        return self.get(self.map(fn))

    def mark_unresponsive(self, timeout_s: float = 5.0) -> None:
        """Live members that do not answer ``info()`` within ``timeout_s`` are marked dead."""
        for i in self.live():
            try:
                ray.get(self.actors[i].info.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self.mark_dead(i)

    def mark_dead(self, i: int) -> None:
        if i not in self.dead:
            self.dead.add(i)
            self.failures += 1

    def revive(self, timeout_s: float = 120.0) -> list[int]:
        """Dead members that answer again (restarted by Ray); the caller brings them up to date."""
        back = []
        for i in sorted(self.dead):
            try:
                ray.get(self.actors[i].info.remote(), timeout=timeout_s)
                back.append(i)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
        self.dead -= set(back)
        return back

    def wait_ready(self, timeout_s: float) -> None:
        """Every member answers ``info()``; else ``RoleStartError`` naming the role and why."""
        try:
            ray.get([a.info.remote() for a in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RoleStartError(
                f"{self.role}: not ready after {timeout_s:.0f}s — are its resources available on the cluster? "
                f"(check `ray status` against {self.role}.resources)"
            ) from None
        except ray.exceptions.RayActorError as e:
            raise RoleStartError(f"{self.role}: failed to start: {_root_cause(e)}") from None


@dataclass
class Roles:
    generators: RoleGroup = field(default_factory=lambda: RoleGroup("generator"))
    verifiers: RoleGroup = field(default_factory=lambda: RoleGroup("verifier"))
    references: RoleGroup = field(default_factory=lambda: RoleGroup("reference"))
    learners: RoleGroup = field(default_factory=lambda: RoleGroup("learner"))
    metrics: Any = None
    placement_groups: list[PlacementGroup] = field(default_factory=list)
    # async mode: key of the node-local flag the generators raise while generating (actors/core_share.py)
    core_share: str | None = None

    def groups(self) -> list[RoleGroup]:
        return [self.generators, self.verifiers, self.references, self.learners]

    def all_actors(self) -> list[Any]:
        extra = [self.metrics] if self.metrics is not None else []
        return [a for g in self.groups() for a in g.actors] + extra


def actor_options(res: Resources, **extra: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        opts["resources"] = dict(res.custom)
    return opts | extra


def _bundle(res: Resources) -> dict[str, float]:
    bundle = {"CPU": res.num_cpus, "GPU": res.num_gpus} | dict(res.custom)
    return {k: v for k, v in bundle.items() if v > 0} or {"CPU": 0.001}


@ray.remote(num_cpus=0)
def _free_port() -> tuple[str, int]:
    """Host address and a free TCP port on the node where learner rank 0 will run."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def check_cluster_fits(cfg: RunConfig) -> None:
    """Fail fast, naming the role, when the connected cluster cannot host a role's replicas at all
    (e.g. a custom resource no node has) — instead of waiting for the start-up timeout."""
    from pipeline.driver.resource_plan import ClusterSpec, check_satisfiable

    problems = check_satisfiable(cfg, ClusterSpec.from_ray_nodes(ray.nodes()))
    if problems:
        raise RoleStartError("the cluster cannot host this run: " + "; ".join(problems))


def start_roles(
    cfg: RunConfig, model_path: str, run_dir: str, *, resume_after_step: int | None, timeout_s: float = 600
) -> Roles:
    check_cluster_fits(cfg)
    roles = Roles()
    try:
        _start(roles, cfg, model_path, run_dir, resume_after_step, timeout_s)
    except Exception:
        stop_roles(roles)
        raise
    return roles


def _root_cause(e: BaseException) -> str:
    text = str(e)
    for line in reversed(text.splitlines()):
        if "Error" in line or "error" in line:
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def _start(
    roles: Roles,
    cfg: RunConfig,
    model_path: str,
    run_dir: str,
    resume_after_step: int | None,
    timeout_s: float,
) -> None:
    temp, seed = cfg.generator.temperature, cfg.schedule.seed
    metrics_name = f"metrics-{cfg.name}-{uuid.uuid4().hex[:8]}"
    if cfg.schedule.mode == "async" and cfg.learner.threads_while_generating is not None:
        roles.core_share = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
    roles.metrics = (
        ray.remote(Metrics)
        .options(**actor_options(cfg.metrics.resources, name=metrics_name))
        .remote(cfg.metrics, run_dir, resume_after_step=resume_after_step)
    )
    RoleGroup("metrics", [roles.metrics]).wait_ready(timeout_s)

    pg = placement_group([_bundle(cfg.learner.resources)] * cfg.learner.ranks, strategy="PACK")
    roles.placement_groups.append(pg)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RoleStartError(
            f"learner: placement group of {cfg.learner.ranks} x {_bundle(cfg.learner.resources)} not satisfiable "
            f"within {timeout_s:.0f}s — lower learner.ranks/resources or add nodes"
        ) from None

    def in_pg(i: int) -> dict[str, Any]:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)}

    addr, port = ray.get(_free_port.options(**in_pg(0)).remote())
    learner_res = cfg.learner.resources
    roles.learners.actors = [
        ray.remote(Learner)
        .options(
            num_cpus=learner_res.num_cpus,
            num_gpus=learner_res.num_gpus,
            resources=dict(learner_res.custom) or None,
            **in_pg(rank),
        )
        .remote(
            cfg.learner,
            cfg.algorithm,
            model_path,
            rank=rank,
            world_size=cfg.learner.ranks,
            master_addr=addr,
            master_port=port,
            seed=seed,
            temperature=temp,
            metrics_actor=metrics_name,
            core_share=roles.core_share,
        )
        for rank in range(cfg.learner.ranks)
    ]
    roles.generators.actors = [
        ray.remote(Generator)
        .options(**actor_options(cfg.generator.resources, max_restarts=cfg.generator.max_restarts))
        .remote(
            cfg.generator,
            model_path,
            replica=i,
            seed=seed,
            metrics_actor=metrics_name,
            weight_sync=cfg.weight_sync,
            core_share=roles.core_share,
        )
        for i in range(cfg.generator.replicas)
    ]
    roles.verifiers.actors = [
        ray.remote(VerifierWorker)
        .options(**actor_options(cfg.verifier.resources, max_restarts=2))
        .remote(verifier_config_for_run(cfg.verifier, cfg.data), replica=i)
        for i in range(cfg.verifier.replicas)
    ]
    if cfg.use_reference:
        roles.references.actors = [
            ray.remote(Reference)
            .options(**actor_options(cfg.reference.resources))
            .remote(cfg.reference, model_path, replica=i, temperature=temp, metrics_actor=metrics_name)
            for i in range(cfg.reference.replicas)
        ]
    roles.verifiers.wait_ready(timeout_s)
    roles.references.wait_ready(timeout_s)
    # The learner bounds its own waits (learner.start_timeout_s) and then names what it waited for: give
    # it room to say so before this generic bound fires.
    roles.learners.wait_ready(max(timeout_s, cfg.learner.start_timeout_s + 120))
    roles.generators.wait_ready(timeout_s)


def stop_roles(roles: Roles, *, wait_s: float = 60) -> None:
    """Kill every actor and remove every placement group of the run (idempotent). Returns once the
    actors are dead (up to ``wait_s``): ``ray.kill`` only asks, and a run that is restarted or a test that
    checks the cluster right after must not meet the old roles still holding their CPUs."""
    if roles.metrics is not None:
        try:
            ray.get(roles.metrics.close.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - best effort; the actor is killed next
            pass
    actors = roles.all_actors()
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
    wait_until_dead(actors, wait_s)
    for pg in roles.placement_groups:
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001
            pass
    if roles.core_share:  # generators drop their flags on exit; the run's (node-local) folder goes here
        from actors.core_share import remove_key

        remove_key(roles.core_share)
    for group in roles.groups():
        group.actors, group.dead = [], set()
    roles.metrics, roles.placement_groups = None, []


def placement_report(roles: Roles) -> list[dict[str, Any]]:
    """Where each actor runs (role, replica, node) — logged into the run dir and metrics."""
    return ray.get([a.info.remote() for a in roles.all_actors()])


def wait_until_dead(actors: list, timeout_s: float) -> list:
    """Wait until every actor is dead; returns those still alive at the deadline. An actor that answers
    ``__ray_ready__`` is still alive (its kill is not processed yet); a dead one raises ActorDiedError."""
    deadline = time.monotonic() + timeout_s
    alive = list(actors)
    while alive and time.monotonic() < deadline:
        probes = {a: a.__ray_ready__.remote() for a in alive}
        ray.wait(
            list(probes.values()), num_returns=len(probes), timeout=max(0.1, deadline - time.monotonic())
        )
        still = []
        for actor, ref in probes.items():
            try:
                ray.get(ref, timeout=0)
                still.append(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                pass
            except ray.exceptions.GetTimeoutError:
                still.append(actor)
        alive = still
        if alive:
            time.sleep(0.2)
    return alive
