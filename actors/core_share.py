"""Cores handed back and forth between a generator and a learner that share a CPU node (one-step-async).

Why: in async mode generation of step t+1 runs while the learner trains on step t. When both roles sit on
the same cores, fixed thread counts oversubscribe them: an OpenMP region waits for its slowest thread,
and a thread that shares its core with the other role is always the slowest (bench/README.md has the
measured cost). Instead the generator raises a
node-local flag while it generates, and the learner drops to ``threads_while_generating`` threads until
the flag is gone, then takes every core back. The learner looks at the flag at every transformer block,
in forward and in backward, so it reacts within one layer.

The flag is a file ``<root>/<key>/<replica>.<pid>`` on tmpfs: node-local by construction (a generator on
another node never slows this learner), ~2 us to check, and a flag left by a killed generator is
ignored because its pid is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("covrl.core_share")


def flag_root() -> Path:
    shm = Path("/dev/shm")
    return (
        shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    ) / "covrl-core-share"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class BusyFlag:
    """Generator side: ``with flag.held(): generate()`` marks this node's cores as wanted by generation."""

    def __init__(self, key: str, replica: int) -> None:
        self.dir = flag_root() / key
        self.path = self.dir / f"{replica}.{os.getpid()}"
        self.warned = False
        for stale in self.dir.glob(f"{replica}.*"):  # left by a previous process of this replica
            stale.unlink(missing_ok=True)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Never fails generation: if the flag cannot be written, the learner just keeps its threads."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError as e:
            if not self.warned:
                log.warning(
                    "core sharing off: cannot write %s (%s); the learner keeps its threads", self.path, e
                )
                self.warned = True
            yield
            return
        try:
            yield
        finally:
            self.path.unlink(missing_ok=True)


def generating(flag_dir: Path) -> bool:
    """Is any live generator process on this node generating?"""
    try:
        with os.scandir(flag_dir) as entries:
            pids = [e.name.rpartition(".")[2] for e in entries]
    except FileNotFoundError:
        return False
    return any(pid.isdigit() and _alive(int(pid)) for pid in pids)


class ThreadGovernor:
    """Learner side: sets the intra-op thread count from the flag; keeps the seconds spent yielded."""

    def __init__(
        self,
        key: str,
        *,
        threads: int,
        threads_while_generating: int,
        set_threads: Callable[[int], None] | None = None,
    ) -> None:
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.flag_dir = flag_root() / key
        self.threads, self.reduced = threads, threads_while_generating
        self._set = set_threads
        self.current = threads
        self._since = time.perf_counter()
        self.yielded_s = 0.0

    def poll(self) -> None:
        want = self.reduced if generating(self.flag_dir) else self.threads
        if want != self.current:
            now = time.perf_counter()
            if self.current == self.reduced:
                self.yielded_s += now - self._since
            self._since, self.current = now, want
            self._set(want)

    def end_step(self) -> float:
        """Seconds lent during this step (for its metrics). The learner is idle until its next step, so it
        takes its threads back here: idle time is not counted as lent, and the next poll decides again."""
        if self.current == self.reduced:
            self.yielded_s += time.perf_counter() - self._since
            self.current = self.threads
            self._set(self.threads)
        out, self.yielded_s = self.yielded_s, 0.0
        return out

    def attach(self, module) -> None:
        """Poll before every block (each module of every ``ModuleList``: the transformer layers) runs its
        forward, and again when backward reaches the block's output, so a long backward also hands the
        cores back as soon as generation ends."""
        import torch

        def on_output(_module, _args, out):
            first = out[0] if isinstance(out, tuple) and out else out
            if isinstance(first, torch.Tensor) and first.requires_grad:
                first.register_hook(lambda _grad: self.poll())

        for sub in module.modules():
            if isinstance(sub, torch.nn.ModuleList):
                for block in sub:
                    block.register_forward_pre_hook(lambda *_: self.poll())
                    block.register_forward_hook(on_output)


def remove_key(key: str) -> None:
    """Driver side, at the end of a run: drop the run's flag directory on this node."""
    shutil.rmtree(flag_root() / key, ignore_errors=True)
