"""The ``code`` verifier: run a candidate Python program against test cases in a sandboxed subprocess.

Containment, in layers (``sandbox_capabilities()`` reports which ones this machine supports):

- **namespaces** (``unshare --net --pid --fork --mount-proc``, as root or via ``--map-root-user``): no
  network at all (a fresh network namespace has only a downed loopback), and the program is PID 1's child
  in its own PID namespace, so every process it starts (double-forked daemons included) is killed by the
  kernel when the sandbox ends; ``/proc`` shows only the sandbox's own processes.
- **a throw-away uid** (when running as root): the program runs as a random unprivileged uid, so it cannot
  write files it does not own (the host's files, the test's files), read other processes' environments
  through ``/proc``, or signal host processes, and ``RLIMIT_NPROC`` (ignored for root) caps its processes.
  With namespaces, the world-writable ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are replaced by private
  64 MiB tmpfs mounts (the working directory is bind-mounted back), so it cannot write anywhere shared.
- **rlimits** set before exec: ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (address space),
  ``RLIMIT_NPROC`` (fork bombs), ``RLIMIT_FSIZE`` (file and captured-output size), ``RLIMIT_NOFILE``,
  ``RLIMIT_CORE`` = 0.
- **process hygiene**: a fresh temporary working directory, a scrubbed environment (no parent secrets),
  ``python -I`` (no user site, no ``PYTHON*`` variables), its own session so the whole process group is
  ``SIGKILL``-ed on the wall-clock timeout, then a sweep that kills (and reports) anything still running
  under the sandbox uid. A program that leaves processes behind scores 0.

Limits of this design (documented, not hidden): other world-writable directories stay writable (and
``/tmp`` too without namespaces); without ``unshare`` there is no network isolation; memory is limited per process, not per
sandbox (``max_procs * memory_mb`` in total). For untrusted code at scale use a container/gVisor runtime.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.verifiers.base import Score, Verifier, register_verifier

# Runs first inside the sandbox (as the sandbox uid): set rlimits, fork the program, reap, count leftovers.
_BOOT = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, (soft, hard) in cfg["rlimits"].items():
    try:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    except (ValueError, OSError):
        pass
uid = cfg["drop_to"]
if uid is not None:  # still root inside our own mount namespace: hide the shared temp dirs, then drop
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        work = os.getcwd()
        keep = os.open(work, os.O_RDONLY)
        for d in cfg["private_dirs"]:
            if os.path.isdir(d):
                libc.mount(b"tmpfs", d.encode(), b"tmpfs", 2 | 4, b"size=64m,mode=1777")  # nosuid, nodev
        os.makedirs(work, exist_ok=True)
        libc.mount(f"/proc/self/fd/{keep}".encode(), work.encode(), None, 4096, None)  # MS_BIND
        os.close(keep)
        os.chdir(work)
    except Exception:
        pass
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL: die with the launcher
except Exception:
    pass
report = cfg["report_fd"]
pid = os.fork()
if pid == 0:
    os.close(report)
    os.execv(cfg["python"], [cfg["python"], "-I", "main.py"])
status = 0
while True:
    try:
        done, st = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    if done == pid:
        status = st
        break
left = 0
if os.getpid() == 1:  # own PID namespace: every other pid here is something the program left behind
    left = sum(1 for d in os.listdir("/proc") if d.isdigit() and d != "1")
os.write(report, json.dumps({"status": status, "left": left}).encode())
os._exit(0)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``memory_mb`` is address space per process; ``cpu_s`` CPU seconds per process."""

    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    max_procs: int = 16
    file_size_mb: int = 8
    max_output_bytes: int = 1 << 20
    max_open_files: int = 64


@dataclass(frozen=True)
class SandboxCapabilities:
    """What this machine supports; probed once per process by ``sandbox_capabilities()``."""

    python: str
    unshare_prefix: tuple[str, ...] = ()
    net_isolated: bool = False
    pid_namespace: bool = False
    uid_separation: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # negative: killed by that signal; None: timed out
    stdout: str
    stderr: str
    timed_out: bool
    leftovers: int  # processes still alive after the program ended (all killed)
    wall_s: float


def _fresh_uid() -> int:
    return 1_000_000 + secrets.randbelow(1_000_000_000)


def _probe(cmd: list[str], **kwargs: Any) -> bool:
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"}, **kwargs)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == b"ok"


@functools.cache
def sandbox_capabilities(python: str | None = None) -> SandboxCapabilities:
    """Probe (once) which containment layers work here and which interpreter the sandbox uid can run."""
    root = os.geteuid() == 0
    uid = _fresh_uid()
    who = {"user": uid, "group": uid, "extra_groups": []} if root else {}
    check = ["-I", "-S", "-c", "print('ok')"]
    candidates = [python] if python else [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    interp = next((c for c in candidates if c and os.path.exists(c) and _probe([c, *check], **who)), None)
    if interp is None:
        raise RuntimeError(
            f"no Python interpreter among {candidates} is executable by the sandbox user"
            + (f" (uid {uid}: the interpreter and its directories must be world-readable)" if root else "")
            + "; pass the code verifier option python='/usr/bin/python3' or install one system-wide"
        )
    notes = []
    unshare = shutil.which("unshare")
    ns = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    attempts = []
    if unshare and root:
        attempts.append((unshare, *ns))
    if unshare:
        attempts.append((unshare, "--user", "--map-root-user", *ns))
        attempts.append((unshare, "--user", "--map-root-user", "--net"))
    for prefix in attempts:
        if _probe([*prefix, interp, *check]):
            pid_ns = "--pid" in prefix
            if not pid_ns:
                notes.append("no PID namespace: leftover processes are found by scanning (less robust)")
            return SandboxCapabilities(
                python=interp,
                unshare_prefix=prefix,
                net_isolated=True,
                pid_namespace=pid_ns,
                uid_separation=root,
                notes=tuple(notes),
            )
    notes.append("unshare unavailable: NO network isolation (run the verifier in a network-less container)")
    return SandboxCapabilities(python=interp, uid_separation=root, notes=tuple(notes))


def _sweep(uid: int | None, token: str) -> int:
    """Kill every process still running as the sandbox uid (or, without one, carrying our env token)."""
    import psutil

    killed = 0
    for _ in range(5):
        found = []
        for proc in psutil.process_iter(["pid", "uids"]):
            try:
                if uid is not None:
                    hit = proc.info["uids"] is not None and proc.info["uids"].real == uid
                else:
                    hit = proc.pid != os.getpid() and proc.environ().get("COVRL_SANDBOX") == token
            except (psutil.Error, OSError):
                continue
            if hit:
                found.append(proc)
        if not found:
            break
        for proc in found:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(found, timeout=1.0)
        killed += len(found)
    return killed


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(
    source: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits(), python: str | None = None
) -> RunResult:
    """Run ``source`` as ``main.py`` in a fresh sandbox; never raises for anything the program does."""
    caps = sandbox_capabilities(python)
    uid = _fresh_uid() if caps.uid_separation else None
    token = secrets.token_hex(8)
    workdir = tempfile.mkdtemp(prefix="covrl-sbx-")
    private = tempfile.mkdtemp(prefix="covrl-sbx-io-")  # host-only: captured output, never shared
    report_r, report_w = os.pipe()
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(source)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "main.py"), uid, uid)
        os.chmod(workdir, 0o700)
        nproc = limits.max_procs + 1 if uid is not None else _own_process_count() + limits.max_procs
        cfg = {
            "python": caps.python,
            "report_fd": report_w,
            # As root with namespaces the bootstrap mounts private temp dirs, then drops to ``uid``.
            "drop_to": uid if caps.unshare_prefix and uid is not None else None,
            "private_dirs": ["/tmp", "/var/tmp", "/dev/shm"],
            "rlimits": {
                "RLIMIT_CPU": (limits.cpu_s, limits.cpu_s + 1),
                "RLIMIT_AS": (limits.memory_mb << 20, limits.memory_mb << 20),
                "RLIMIT_NPROC": (nproc, nproc),
                "RLIMIT_FSIZE": (limits.file_size_mb << 20, limits.file_size_mb << 20),
                "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
                "RLIMIT_CORE": (0, 0),
            },
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "COVRL_SANDBOX": token}
        cmd = [*caps.unshare_prefix, caps.python, "-I", "-S", "-c", _BOOT, json.dumps(cfg)]
        # Without namespaces the bootstrap cannot drop privileges itself: Popen does it before exec.
        who = (
            {"user": uid, "group": uid, "extra_groups": []}
            if uid is not None and not caps.unshare_prefix
            else {}
        )
        out_path, err_path, in_path = (os.path.join(private, n) for n in ("out", "err", "in"))
        with open(in_path, "w") as f:
            f.write(stdin)
        start = time.monotonic()
        with open(in_path, "rb") as fin, open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdin=fin, stdout=fout, stderr=ferr,
                start_new_session=True, pass_fds=(report_w,), close_fds=True, **who,
            )  # fmt: skip
        os.close(report_w)
        report_w = -1
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _killpg(proc.pid)
            proc.wait()
        wall = time.monotonic() - start
        report = _read_report(report_r)
        leftovers = int(report.get("left", 0)) + _sweep(uid, token)
        status = report.get("status")
        code = None if timed_out or status is None else os.waitstatus_to_exitcode(int(status))
        return RunResult(
            returncode=code,
            stdout=_read(out_path, limits.max_output_bytes),
            stderr=_read(err_path, limits.max_output_bytes),
            timed_out=timed_out,
            leftovers=leftovers,
            wall_s=wall,
        )
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _own_process_count() -> int:
    import psutil

    me = os.getuid()
    return sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == me)


def _read_report(fd: int) -> dict[str, Any]:
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 4096)
    except (BlockingIOError, OSError):
        return {}
    try:
        return json.loads(data) if data else {}
    except ValueError:
        return {}


# ---------------------------------------------------------------------------------------------- tests


@dataclass(frozen=True)
class TestCase:
    stdin: str = ""
    expected_stdout: str | None = None  # None: pass = exit code 0 (assert-style)
    test_code: str = ""  # appended to the program (assert-style)


_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(response: str) -> str:
    """The last fenced code block of a response (```python ... ```), or the whole response if none."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def parse_tests(ground_truth: str, extra: dict[str, Any] | None = None) -> list[TestCase]:
    """Test cases from ``extra['tests']`` or the ground truth, in any of these forms:

    ``{"inputs": [...], "outputs": [...]}`` (APPS/TACO), ``[{"input": ..., "output": ...}, ...]`` (also
    ``stdin``/``stdout`` keys), ``{"test_code": "assert f(1) == 2"}``, or plain assert code as the string.
    """
    spec: Any = (extra or {}).get("tests", ground_truth)
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return [TestCase(test_code=spec)]
    if isinstance(spec, dict) and "test_code" in spec:
        return [TestCase(test_code=str(spec["test_code"]))]
    if isinstance(spec, dict) and "inputs" in spec and "outputs" in spec:
        if len(spec["inputs"]) != len(spec["outputs"]):
            raise ValueError("code tests: 'inputs' and 'outputs' must have the same length")
        return [TestCase(str(i), str(o)) for i, o in zip(spec["inputs"], spec["outputs"])]
    if isinstance(spec, dict) and "tests" in spec:
        spec = spec["tests"]
    if isinstance(spec, list) and all(isinstance(t, dict) for t in spec):
        return [
            TestCase(str(t.get("input", t.get("stdin", ""))), str(t.get("output", t.get("stdout", ""))))
            for t in spec
        ]
    raise ValueError(
        "code tests: expected {'inputs': [...], 'outputs': [...]}, a list of {'input', 'output'} dicts, "
        "{'test_code': ...} or assert code"
    )


def _same_output(got: str, want: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    return norm(got) == norm(want)


@register_verifier("code")
class CodeVerifier(Verifier):
    """Score = 1 if the program passes every test (``partial_credit``: the fraction passed), else 0 with
    the first failure as reason. Keep ``total_wall_s`` below ``verifier.timeout_s``."""

    def __init__(
        self,
        *,
        wall_s: float = 5.0,
        cpu_s: int | None = None,
        memory_mb: int = 512,
        max_procs: int = 16,
        total_wall_s: float = 8.0,
        partial_credit: bool = False,
        python: str | None = None,
    ):
        self.limits = SandboxLimits(
            wall_s=wall_s, cpu_s=cpu_s or max(1, int(wall_s)), memory_mb=memory_mb, max_procs=max_procs
        )
        self.total_wall_s, self.partial_credit, self.python = total_wall_s, partial_credit, python
        sandbox_capabilities(python)  # fail at construction, not per sample, if no interpreter works

    def score(self, prompts, responses, ground_truths, extras) -> list[Score]:
        return [self.score_one(r, g, e) for r, g, e in zip(responses, ground_truths, extras)]

    def score_one(self, response: str, ground_truth: str, extra: dict[str, Any] | None = None) -> Score:
        try:
            tests = parse_tests(ground_truth, extra)
        except ValueError as err:
            return Score(0.0, str(err))
        program, passed, first_failure = extract_program(response), 0, None
        deadline = time.monotonic() + self.total_wall_s
        for i, test in enumerate(tests):
            if time.monotonic() >= deadline:
                first_failure = first_failure or f"time budget {self.total_wall_s} s exhausted at test {i}"
                break
            source = program if not test.test_code else f"{program}\n\n{test.test_code}\n"
            result = run_python(source, stdin=test.stdin, limits=self.limits, python=self.python)
            failure = self._failure(result, test, i)
            if failure is None:
                passed += 1
                continue
            if result.leftovers:  # never reward a program that leaves processes behind
                return Score(0.0, failure)
            first_failure = first_failure or failure
            if not self.partial_credit:
                break
        if passed == len(tests):
            return Score(1.0)
        return Score(passed / len(tests) if self.partial_credit else 0.0, first_failure)

    def _failure(self, result: RunResult, test: TestCase, i: int) -> str | None:
        if result.timed_out:
            return f"timeout after {self.limits.wall_s} s on test {i}"
        if result.leftovers:
            return f"left {result.leftovers} process(es) running after test {i} (killed)"
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
            return f"runtime error on test {i}: {last[:200]}"
        if (
            test.expected_stdout is not None
            and not test.test_code
            and not _same_output(result.stdout, test.expected_stdout)
        ):
            return f"wrong output on test {i}"
        return None
