"""Will a run config fit a cluster? What every role asks Ray for, and a greedy placement check.

``plan_resources(cfg)`` lists, per role, the resource bundles its actors ask for (one bundle per replica
or learner rank, exactly as ``pipeline.driver.roles`` requests them). ``check_satisfiable(cfg, cluster)`` packs
those bundles onto the nodes of a ``ClusterSpec`` (first-fit, biggest demands first, learner ranks as a
gang) and returns the problems found, each naming the role: an empty list means every role fits at once.

A ``ClusterSpec`` is a list of node kinds (CPUs, GPUs, custom resources, how many such nodes), given
inline, read from a Ray cluster-launcher YAML (``available_node_types`` x ``max_workers``), from a
KubeRay ``RayJob``/``RayCluster`` manifest (head + worker groups x ``maxReplicas``), or from the output of
``ray.nodes()`` of a live cluster. Pure: no Ray import, no I/O beyond reading the YAML you name.

    cfg = load_config("configs/presets/qwen2.5-7b-kl-cov.yaml")
    problems = check_satisfiable(cfg, ClusterSpec.from_cluster_yaml("deploy/cluster.yaml"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from schemas.config import Resources
from schemas.run_config import RunConfig

EPS = 1e-6  # Ray keeps resource amounts to 1e-4; anything below that is rounding noise


def bundle_of(res: Resources) -> dict[str, float]:
    """The resource dict one actor with ``res`` asks Ray for (zero amounts dropped)."""
    out = {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)} | {
        k: float(v) for k, v in res.custom.items()
    }
    return {k: v for k, v in out.items() if v > 0}


@dataclass(frozen=True)
class RoleBundles:
    """What one role asks for: ``len(bundles)`` actors; ``gang`` = all or nothing (a placement group)."""

    role: str
    bundles: list[dict[str, float]]
    gang: bool = False

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out


def plan_resources(cfg: RunConfig) -> list[RoleBundles]:
    """Per role, one bundle per actor, as ``pipeline.driver.roles.start_roles`` requests them.

    Learner ranks form one placement group (gang-scheduled); the reference role appears only when the
    run uses it (``algorithm.kl_coef > 0`` or ``reference.enabled: always``).
    """
    plan = [
        RoleBundles("learner", [bundle_of(cfg.learner.resources)] * cfg.learner.ranks, gang=True),
        RoleBundles("generator", [bundle_of(cfg.generator.resources)] * cfg.generator.replicas),
    ]
    if cfg.use_reference:
        plan.append(RoleBundles("reference", [bundle_of(cfg.reference.resources)] * cfg.reference.replicas))
    plan.append(RoleBundles("verifier", [bundle_of(cfg.verifier.resources)] * cfg.verifier.replicas))
    plan.append(RoleBundles("metrics", [bundle_of(cfg.metrics.resources)]))
    return plan


@dataclass(frozen=True)
class NodeSpec:
    """``count`` identical nodes of kind ``name``."""

    name: str
    cpus: float
    gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    count: int = 1

    def capacity(self) -> dict[str, float]:
        return {"CPU": float(self.cpus), "GPU": float(self.gpus)} | {
            k: float(v) for k, v in self.custom.items()
        }


@dataclass(frozen=True)
class ClusterSpec:
    nodes: list[NodeSpec]

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in self.nodes:
            for k, v in n.capacity().items():
                out[k] = out.get(k, 0.0) + v * n.count
        return out

    def describe(self) -> str:
        parts = []
        for n in self.nodes:
            custom = "".join(f", {k}={v:g}" for k, v in sorted(n.custom.items()))
            parts.append(f"{n.count} x {n.name} (CPU={n.cpus:g}, GPU={n.gpus:g}{custom})")
        return "; ".join(parts)

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_nodes(cls, nodes: list[dict[str, Any]]) -> ClusterSpec:
        """Inline: ``[{"name": "gpu", "cpus": 96, "gpus": 8, "custom": {"gen_node": 1}, "count": 2}, ...]``."""
        return cls([NodeSpec(**n) for n in nodes])

    @classmethod
    def from_cluster_yaml(cls, path: str | Path) -> ClusterSpec:
        """A Ray cluster-launcher YAML: every ``available_node_types`` entry at its ``max_workers``
        (plus the head node, once, for ``head_node_type``). ``resources`` must list CPU/GPU explicitly."""
        doc = _read_yaml(path)
        types = doc.get("available_node_types") or {}
        head = doc.get("head_node_type")
        if not types or head not in types:
            raise ValueError(f"{path}: needs available_node_types and a head_node_type among them")
        nodes = []
        for name, spec in types.items():
            res = dict(spec.get("resources") or {})
            if "CPU" not in res:
                raise ValueError(
                    f"{path}: available_node_types.{name}.resources must set CPU (and GPU if any)"
                )
            count = int(spec.get("max_workers", 0)) + (1 if name == head else 0)
            if count == 0:
                continue
            cpus, gpus = float(res.pop("CPU")), float(res.pop("GPU", 0))
            nodes.append(NodeSpec(name, cpus, gpus, {k: float(v) for k, v in res.items()}, count))
        return cls(nodes)

    @classmethod
    def from_kuberay(cls, path: str | Path) -> ClusterSpec:
        """A KubeRay ``RayJob`` or ``RayCluster`` manifest: the head group once, each worker group at
        ``maxReplicas`` (else ``replicas``). CPU/GPU come from ``rayStartParams`` (``num-cpus``,
        ``num-gpus``) or the container's limits (``cpu``, ``nvidia.com/gpu``); custom resources from
        ``rayStartParams.resources``."""
        doc = _read_yaml(path)
        spec = doc.get("spec") or {}
        cluster = spec.get("rayClusterSpec", spec)
        head = cluster.get("headGroupSpec")
        if head is None:
            raise ValueError(f"{path}: no headGroupSpec (not a RayJob/RayCluster manifest)")
        nodes = [_kuberay_group("head", head, 1)]
        for g in cluster.get("workerGroupSpecs") or []:
            count = int(g.get("maxReplicas", g.get("replicas", 0)))
            if count:
                nodes.append(_kuberay_group(g.get("groupName", "worker"), g, count))
        return cls(nodes)

    @classmethod
    def from_ray_nodes(cls, ray_nodes: list[dict[str, Any]]) -> ClusterSpec:
        """A live cluster, from ``ray.nodes()`` (alive nodes only; each node its own kind)."""
        nodes = []
        for n in ray_nodes:
            if not n.get("Alive", True):
                continue
            res = {k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
            for k in ("memory", "object_store_memory"):
                res.pop(k, None)
            cpus, gpus = res.pop("CPU", 0.0), res.pop("GPU", 0.0)
            nodes.append(NodeSpec(n.get("NodeID", "node")[:12], cpus, gpus, res))
        return cls(nodes)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return doc


def _quantity(value: Any) -> float:
    """A Kubernetes quantity ('16', '16000m', 8) or a rayStartParams string ('8')."""
    text = str(value).strip().strip('"')
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_group(name: str, group: dict[str, Any], count: int) -> NodeSpec:
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    cpus = _quantity(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", 0))
    gpus = (
        _quantity(params["num-gpus"]) if "num-gpus" in params else _quantity(limits.get("nvidia.com/gpu", 0))
    )
    custom: dict[str, float] = {}
    if "resources" in params:
        raw = str(params["resources"]).strip()
        if raw.startswith('"') and raw.endswith('"'):  # KubeRay's quoting: '"{\"gen_node\": 1}"'
            raw = raw[1:-1].replace('\\"', '"')
        custom = {k: float(v) for k, v in json.loads(raw).items()}
    return NodeSpec(name, cpus, gpus, custom, count)


def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in bundle.items())


def _take(bundle: dict[str, float], free: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def check_satisfiable(cfg: RunConfig, cluster: ClusterSpec) -> list[str]:
    """Problems that would keep this run from starting on ``cluster``; [] when every role fits at once.

    Greedy first-fit: learner ranks (a gang) first, then the other roles, each role's bundles onto the
    node with the least room that still holds them (so big nodes stay free for big bundles). Greedy
    packing can miss a packing that exists, never the reverse: [] is a guarantee, a problem is a
    strong hint. Also checks settings that Ray would accept but the engines would not (a vLLM replica
    whose tensor-parallel size exceeds its GPUs).
    """
    problems: list[str] = []
    gen = cfg.generator
    if gen.resources.num_gpus > 0 and gen.resources.num_gpus + EPS < gen.tensor_parallel_size:
        problems.append(
            f"generator: tensor_parallel_size={gen.tensor_parallel_size} needs {gen.tensor_parallel_size} GPUs per "
            f"replica but generator.resources.num_gpus={gen.resources.num_gpus:g}"
        )
    free = [node.capacity() for node in cluster.nodes for _ in range(node.count)]
    for role in plan_resources(cfg):
        if not role.bundles:
            continue
        b0 = role.bundles[0]
        if not any(_fits(b0, n.capacity()) for n in cluster.nodes):
            missing = [k for k in b0 if k not in cluster.totals()]
            why = f"no node has {', '.join(missing)}" if missing else "no single node is big enough"
            problems.append(
                f"{role.role}: one replica asks {_fmt(b0)} and {why} (cluster: {cluster.describe()})"
            )
            continue
        trial = [dict(f) for f in free]
        placed = 0
        for b in role.bundles:
            candidates = [i for i, f in enumerate(trial) if _fits(b, f)]
            if not candidates:
                break
            # Best fit: the node whose scarce resources (GPU, then CPU) would be left smallest.
            i = min(
                candidates,
                key=lambda j: (trial[j].get("GPU", 0.0) - b.get("GPU", 0.0), trial[j].get("CPU", 0.0)),
            )
            _take(b, trial[i])
            placed += 1
        if placed < len(role.bundles):
            unit = "ranks" if role.role == "learner" else "replicas"
            need = role.total()
            problems.append(
                f"{role.role}: {len(role.bundles)} {unit} x {_fmt(b0)} (total {_fmt(need)}) do not fit — only "
                f"{placed} fit next to the roles placed before it (cluster: {cluster.describe()}); lower "
                f"{role.role}.{'ranks' if role.role == 'learner' else 'replicas'}/resources or add nodes"
            )
            continue
        free = trial
    return problems


def format_plan(cfg: RunConfig) -> str:
    """A readable table of what each role asks for (for docs and dry runs)."""
    lines = []
    for role in plan_resources(cfg):
        if role.bundles:
            lines.append(
                f"{role.role:10s} {len(role.bundles):3d} x {_fmt(role.bundles[0])}  = {_fmt(role.total())}"
            )
    return "\n".join(lines)
