"""Run verifier plug-ins in persistent worker processes with a per-sample timeout.

Why: a reward plug-in is user code. It may raise, hang (sympy on a pathological expression), or kill its
process (``os._exit``, a segfault in a C extension). None of that may crash a training step or lose a
sample. So the verifier actor never calls a plug-in itself; ``IsolatedScorer`` does it in child processes
(multiprocessing ``spawn``: no inherited locks or CUDA/Ray state):

- each worker gets a contiguous slice of the batch and scores it sample by sample, sending each result
  back as soon as it is ready, so every result is attributable to exactly one sample;
- a plug-in exception becomes ``Outcome(0, "error: ...")`` inside the worker, which carries on;
- a sample whose result does not arrive within ``timeout_s`` of the previous one (a hang), or whose worker
  dies (EOF on the pipe: a crash), scores 0 with the reason; the worker and everything it started are
  killed, a fresh worker is started, and it receives the rest of the slice. Results already sent are kept,
  so no sample is lost or scored twice, and the output is in input order;
- the per-sample limit counts only the sample's own work: while a plug-in imports a module for the first
  time (math-verify takes seconds on a busy machine), the worker tells the parent, which stops the
  sample's clock. Imports are bounded instead by ``startup_timeout_s`` per sample, like plug-in loading.
"""

from __future__ import annotations

import builtins
import importlib
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from pipeline.data.verifiers.base import (
    CRASH,
    ERROR,
    OK,
    TIMEOUT,
    VerifierLoadError,
    call_score,
    coerce_scores,
    load_verifier,
)
from schemas.verifier_config import VerifierSpec

_Item = tuple[
    int, str, str, str, str, dict, str
]  # (index, route key, prompt, response, truth, extra, source)


@dataclass(frozen=True)
class Outcome:
    """One sample's result as the actor sees it: the score, why, and how it ended (ok/error/timeout/crash)."""

    score: float
    reason: str | None
    kind: str = OK
    info: dict[str, float] | None = None


class _ImportClock:
    """Worker side: while a sample is scored, tells the parent when the main thread starts and ends loading
    modules it has not loaded before, so that time is not charged to the sample.

    It wraps ``builtins.__import__`` and ``importlib.import_module``; an import of something already
    loaded takes the fast path and sends nothing. Other threads are not watched (one writer on the pipe).
    """

    def __init__(self, conn: Connection):
        self.conn, self.index, self._depth = conn, -1, 0
        self._thread = threading.get_ident()
        self._import, self._import_module = builtins.__import__, importlib.import_module
        builtins.__import__ = self._hooked_import
        importlib.import_module = self._hooked_import_module

    def _watched(self, loaded: bool) -> bool:
        return self.index >= 0 and not self._depth and not loaded and threading.get_ident() == self._thread

    def _run(self, fn: Any, *args: Any) -> Any:
        # Timestamps from the shared monotonic clock: the parent may read these late (busy replacing
        # another worker), and the pause must be what the worker spent importing, not when it was noticed.
        self.conn.send(("import", self.index, True, time.monotonic()))
        self._depth += 1
        try:
            return fn(*args)
        finally:
            self._depth -= 1
            self.conn.send(("import", self.index, False, time.monotonic()))

    def _hooked_import(self, name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        module = sys.modules.get(name) if level == 0 else None
        loaded = module is not None and all(hasattr(module, attr) for attr in fromlist or ())
        if not self._watched(loaded):
            return self._import(name, globals, locals, fromlist, level)
        return self._run(self._import, name, globals, locals, fromlist, level)

    def _hooked_import_module(self, name: str, package: str | None = None) -> Any:
        if not self._watched(name in sys.modules):
            return self._import_module(name, package)
        return self._run(self._import_module, name, package)


def _worker_main(conn: Connection, specs: dict[str, dict[str, Any]]) -> None:
    """Child process: build the plug-ins once, then score the items it is sent, one result per message."""
    try:
        plugins = {key: load_verifier(spec) for key, spec in specs.items()}
    except BaseException as err:  # noqa: BLE001 - report anything to the parent, then exit
        conn.send(("init_error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"))
        return
    clock = _ImportClock(conn)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            items = conn.recv()
        except (EOFError, OSError):
            return
        if items is None:
            return
        for index, key, prompt, response, truth, extra, source in items:
            plugin = plugins[key]
            clock.index = index
            try:
                raw = call_score(plugin, [prompt], [response], [truth], [extra], [source])
                (result,) = coerce_scores(raw, 1, getattr(plugin, "label", type(plugin).__name__))
                message = ("result", index, OK, result.score, result.reason, getattr(result, "info", None))
            except BaseException as err:  # noqa: BLE001 - incl. math-verify's TimeoutException, SystemExit
                message = ("result", index, ERROR, 0.0, f"error: {type(err).__name__}: {err}"[:500], None)
            finally:
                clock.index = -1
            conn.send(message)


class _Worker:
    """Parent-side handle of one worker process and the slice it still has to score."""

    def __init__(self, ctx: Any, specs: dict[str, dict[str, Any]]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main, args=(child, specs), daemon=True, name="covrl-verifier-worker"
        )
        self.proc.start()
        child.close()
        self.queue: deque[_Item] = deque()
        self.deadline = 0.0
        # While the sample in flight imports: its own time left, and when the import began (else None).
        self.paused_at: float | None = None
        self.own_left = 0.0
        self.import_left = 0.0

    def wait_ready(self, timeout_s: float) -> None:
        if not self.conn.poll(timeout_s):
            self.kill()
            raise RuntimeError(
                f"verifier worker did not start within {timeout_s} s; is a plug-in import hanging?"
            )
        try:
            tag, payload = self.conn.recv()
        except (EOFError, OSError) as err:
            self.kill()
            raise RuntimeError(
                f"verifier worker died while starting (exit code {self.proc.exitcode})"
            ) from err
        if tag == "init_error":
            self.kill()
            raise VerifierLoadError(f"verifier plug-in failed to load in the worker process: {payload}")

    def send(self, items: Sequence[_Item], timeout_s: float, import_s: float) -> None:
        self.queue.extend(items)
        self.conn.send(list(items))
        self.next_sample(timeout_s, import_s)

    def next_sample(self, timeout_s: float, import_s: float) -> None:
        self.deadline, self.paused_at, self.import_left = time.monotonic() + timeout_s, None, import_s

    def importing(self, started: bool, at: float) -> None:
        """Stop the sample's clock from ``at`` while it imports (bounded by what is left of its import
        budget); restart it when the import ends."""
        if started and self.paused_at is None:
            self.own_left, self.paused_at = max(0.0, self.deadline - at), at
            self.deadline = at + self.import_left
        elif not started and self.paused_at is not None:
            self.import_left = max(0.0, self.import_left - (at - self.paused_at))
            self.deadline, self.paused_at = at + self.own_left, None

    def kill(self) -> None:
        """Kill the worker and every process it started (e.g. code sandboxes in their own sessions)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [*root.children(recursive=True), root]
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=2.0)
        self.proc.join(timeout=1.0)
        self.conn.close()


class IsolatedScorer:
    """Scores samples with plug-ins living in ``workers`` child processes; see the module docstring.

    ``specs`` maps a route key to the verifier spec used for samples with that key.
    """

    def __init__(
        self,
        specs: Mapping[str, VerifierSpec],
        *,
        timeout_s: float,
        workers: int = 1,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
    ):
        if workers < 1 or timeout_s <= 0:
            raise ValueError("IsolatedScorer needs workers >= 1 and timeout_s > 0")
        self._specs = {key: spec.model_dump() for key, spec in specs.items()}
        self._ctx = mp.get_context(start_method)
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self.restarts = 0
        self._workers: list[_Worker] = []
        try:
            for _ in range(workers):
                self._workers.append(_Worker(self._ctx, self._specs))
            for worker in self._workers:
                worker.wait_ready(startup_timeout_s)
        except BaseException:
            self.close()
            raise

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def score(
        self,
        keys: Sequence[str],
        prompts: Sequence[str],
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[dict] | None = None,
        data_sources: Sequence[str] | None = None,
    ) -> list[Outcome]:
        """One ``Outcome`` per sample, in input order. Never raises for anything a plug-in does.
        ``data_sources`` reach the plug-ins that take them (reward functions); "" when not given."""
        n = len(responses)
        extras = list(extras) if extras is not None else [{} for _ in range(n)]
        sources = list(data_sources) if data_sources is not None else [""] * n
        if not (len(keys) == len(prompts) == len(ground_truths) == len(extras) == len(sources) == n):
            raise ValueError(
                f"score: keys/prompts/responses/ground_truths/extras/data_sources must have equal lengths, "
                f"got {len(keys)}/{len(prompts)}/{n}/{len(ground_truths)}/{len(extras)}/{len(sources)}"
            )
        unknown = set(keys) - set(self._specs)
        if unknown:
            raise ValueError(
                f"score: route keys {sorted(unknown)} have no verifier; known: {sorted(self._specs)}"
            )
        items = [
            (i, keys[i], prompts[i], responses[i], ground_truths[i], extras[i], sources[i]) for i in range(n)
        ]
        results: list[Outcome | None] = [None] * n
        per = -(-n // len(self._workers)) if n else 0
        active: list[int] = []
        for w, worker in enumerate(self._workers):
            chunk = items[w * per : (w + 1) * per]
            if chunk:
                worker.send(chunk, self.timeout_s, self.startup_timeout_s)
                active.append(w)
        while active:
            active = self._step(active, results)
        assert all(r is not None for r in results), "every sample gets exactly one outcome"
        return results  # type: ignore[return-value]

    def _step(self, active: list[int], results: list[Outcome | None]) -> list[int]:
        """Wait for the next results or deadline; returns the workers that still have work."""
        by_conn = {self._workers[w].conn: w for w in active}
        wait_s = max(0.0, min(self._workers[w].deadline for w in active) - time.monotonic())
        for conn in wait(list(by_conn), timeout=wait_s):
            w = by_conn[conn]
            if not self._drain(w, results):
                self._replace(w, results, CRASH, self._crash_reason(w))
        now = time.monotonic()
        for w in active:
            worker = self._workers[w]
            if worker.queue and now >= worker.deadline and not worker.conn.poll():
                if worker.paused_at is not None:
                    reason = f"timeout: a module import did not finish within {self.startup_timeout_s} s"
                else:
                    reason = f"timeout: no result within {self.timeout_s} s"
                self._replace(w, results, TIMEOUT, reason)
        return [w for w in active if self._workers[w].queue]

    def _drain(self, w: int, results: list[Outcome | None]) -> bool:
        """Read every result waiting from worker ``w``; False if its pipe is closed (it died)."""
        worker = self._workers[w]
        try:
            while worker.queue and worker.conn.poll():
                tag, index, *rest = worker.conn.recv()
                expected = worker.queue[0][0]
                if index != expected:
                    raise RuntimeError(f"verifier worker answered sample {index}, expected {expected}")
                if tag == "import":
                    worker.importing(started=rest[0], at=rest[1])
                    continue
                worker.queue.popleft()
                kind, score, reason, info = rest
                results[index] = Outcome(float(score), reason, kind, info)
                worker.next_sample(self.timeout_s, self.startup_timeout_s)
        except (EOFError, OSError):
            return False
        return True

    def _crash_reason(self, w: int) -> str:
        proc = self._workers[w].proc
        proc.join(timeout=1.0)
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"crash: verifier worker process died ({how})"

    def _replace(self, w: int, results: list[Outcome | None], kind: str, reason: str) -> None:
        """Score the sample in flight 0 with ``reason``, replace the worker, hand it the rest of the slice."""
        old = self._workers[w]
        index = old.queue.popleft()[0]
        results[index] = Outcome(0.0, reason, kind)
        rest = list(old.queue)
        old.kill()
        self.restarts += 1
        new = _Worker(self._ctx, self._specs)
        self._workers[w] = new
        new.wait_ready(self.startup_timeout_s)
        if rest:
            new.send(rest, self.timeout_s, self.startup_timeout_s)

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
            worker.proc.join(timeout=2.0)
            if worker.proc.is_alive():
                worker.kill()
        self._workers = []

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
