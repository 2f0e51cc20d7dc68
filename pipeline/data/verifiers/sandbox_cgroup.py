"""A memory cgroup per code-sandbox run, so the limit covers the whole sandbox (every process it starts
and the files it writes to its tmpfs) rather than each process on its own.

Where the memory controller is: cgroup v2 (``memory.max``) when this process's cgroup may create children
with the memory controller enabled, else cgroup v1 (``memory.limit_in_bytes``; hybrid hosts mount it
beside a v2 tree that has no memory controller). The run's cgroup is a child of this process's own and is
removed after the run. ``find_memory_cgroup`` returns None where neither is writable; the sandbox then
falls back to per-process limits (docs/sandbox.md says what that bounds).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryCgroup:
    """Where run cgroups are created: ``parent`` (a directory of cgroup ``version`` 1 or 2)."""

    version: int
    parent: str

    def create(self, limit_bytes: int) -> str:
        """A fresh child cgroup limited to ``limit_bytes`` of memory (no swap); returns its directory. Its
        name carries this process's pid (``run_prefix``), so one left by a killed process can be found."""
        path = os.path.join(self.parent, run_prefix() + secrets.token_hex(6))
        os.mkdir(path)
        try:
            if self.version == 2:
                _write(os.path.join(path, "memory.max"), str(limit_bytes))
                _write_if_exists(os.path.join(path, "memory.swap.max"), "0")
            else:
                _write(os.path.join(path, "memory.limit_in_bytes"), str(limit_bytes))
                _write_if_exists(os.path.join(path, "memory.memsw.limit_in_bytes"), str(limit_bytes))
        except OSError:
            os.rmdir(path)
            raise
        return path

    def oom_killed(self, path: str) -> bool:
        """Whether the kernel killed a process of the run's cgroup for exceeding its limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(path, name)) as f:
                fields = dict(line.split() for line in f if len(line.split()) == 2)
        except OSError:
            return False
        return int(fields.get("oom_kill", 0)) > 0

    def remove(self, path: str) -> None:
        """Kill whatever is left in the cgroup and remove it (retried while the last processes exit)."""
        for _ in range(50):
            pids = _pids(path)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def run_prefix(pid: int | None = None) -> str:
    """Name prefix of the runs (host folders, cgroups) of process ``pid`` (default: this one)."""
    return f"covrl-sbx-{os.getpid() if pid is None else pid}-"


def owner_pid(name: str) -> int | None:
    """The pid in a ``run_prefix`` name, or None for any other name."""
    parts = os.path.basename(name).split("-")
    if len(parts) < 4 or parts[:2] != ["covrl", "sbx"] or not parts[2].isdigit():
        return None
    return int(parts[2])


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _write_if_exists(path: str, value: str) -> None:
    if os.path.exists(path):
        _write(path, value)


def _pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def _own_cgroups() -> dict[str, str]:
    """Controller list (``""`` for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            out[controllers] = path
    return out


def _mounts(fstype: str) -> list[tuple[str, list[str]]]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] == fstype:
                out.append((parts[1], parts[3].split(",")))
    return out


def _candidates() -> list[MemoryCgroup]:
    own, found = _own_cgroups(), []
    if "" in own:
        for mountpoint, _ in _mounts("cgroup2"):
            base = os.path.join(mountpoint, own[""].lstrip("/"))
            try:
                with open(os.path.join(base, "cgroup.controllers")) as f:
                    if "memory" not in f.read().split():
                        continue
                with open(os.path.join(base, "cgroup.subtree_control")) as f:
                    enabled = "memory" in f.read().split()
                if not enabled:  # fails (EBUSY) where this cgroup has processes and is not a root
                    _write(os.path.join(base, "cgroup.subtree_control"), "+memory")
            except OSError:
                continue
            found.append(MemoryCgroup(2, base))
    for mountpoint, options in _mounts("cgroup"):
        key = next((k for k in own if "memory" in k.split(",")), None)
        if "memory" in options and key is not None:
            found.append(MemoryCgroup(1, os.path.join(mountpoint, own[key].lstrip("/"))))
    return found


def find_memory_cgroup() -> MemoryCgroup | None:
    """A place where a run cgroup can be created and limited right now (tried, then removed), or None."""
    try:
        candidates = _candidates()
    except OSError:
        return None
    for cgroup in candidates:
        try:
            cgroup.remove(cgroup.create(64 << 20))
        except OSError:
            continue
        return cgroup
    return None
