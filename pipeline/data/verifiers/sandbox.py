"""The code sandbox: run an untrusted Python program in a contained subprocess (the ``code`` verifier's
engine, ``pipeline.data.verifiers.code``).

Containment, in layers (docs/sandbox.md lists hostile programs and what happens to each):

- **namespaces** (``unshare --mount --net --ipc --pid --fork``, as root or, unprivileged, in a user
  namespace): no network at all (a fresh network namespace has only a downed loopback); System V and
  POSIX IPC objects of its own, gone with the run; the program is a child of PID 1 in its own PID
  namespace, so every process it starts (double-forked daemons included) is killed by the kernel when
  the run ends, and ``/proc`` shows only the sandbox's own processes.
- **a minimal root** (``sandbox_fs``, ``sandbox_boot``): the program's whole filesystem is an empty tmpfs
  holding, read-only, the interpreter, the shared libraries it maps and its standard library (its
  site-packages hidden), a few device nodes and a fresh ``/proc``; the host's root is detached, so
  ``/etc/passwd``, the project's files and every dataset on disk do not exist for it.
- **one writable place**: a tmpfs of ``disk_mb`` (working dir ``/sandbox/work`` and ``/tmp``,
  ``/var/tmp``, ``/dev/shm``), private to the run and gone with it: the total written is bounded.
- **a memory cgroup per run** (``sandbox_cgroup``; v2, or v1 where the memory controller is there):
  all the sandbox's processes and files together stay under ``memory_mb + disk_mb``. Without a writable
  memory cgroup the bound is per process (``RLIMIT_AS``), i.e. ``max_procs * memory_mb`` in total;
  ``sandbox_capabilities().notes`` says so.
- **a throw-away uid** (when running as root): a random unprivileged uid per run, so ``RLIMIT_NPROC``
  caps its processes and it can signal nothing of the host's; in a user namespace every capability is
  dropped instead.
- **rlimits** set before exec: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_NPROC``, ``RLIMIT_FSIZE`` (file and
  captured-output size), ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0.
- **process hygiene**: a scrubbed environment, ``python -I``, its own session so the whole process group
  is ``SIGKILL``-ed on the wall-clock timeout. A program that leaves processes behind scores 0.

Fail closed: where no namespace works, ``sandbox_capabilities`` raises ``SandboxUnavailable`` (and so does
constructing the ``code`` verifier) instead of running untrusted code with the host's files in view.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.verifiers import sandbox_fs
from pipeline.data.verifiers.sandbox_cgroup import MemoryCgroup, find_memory_cgroup, owner_pid, run_prefix

_BOOT = (Path(__file__).with_name("sandbox_boot.py")).read_text()
_NAMESPACES = ("--mount", "--net", "--ipc", "--pid", "--fork", "--kill-child")


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate submissions; the message says what is missing and what to do."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``memory_mb``: address space per process and, with a memory cgroup, the resident
    memory of all processes together (plus ``disk_mb`` for the files they write); ``cpu_s`` CPU seconds
    per process; ``disk_mb`` and ``max_files`` bound everything written during the run."""

    wall_s: float = 5.0
    cpu_s: int = 4
    memory_mb: int = 512
    max_procs: int = 16
    file_size_mb: int = 8
    disk_mb: int = 64
    max_files: int = 4096
    max_output_bytes: int = 1 << 20
    max_open_files: int = 64


@dataclass(frozen=True)
class SandboxCapabilities:
    """How this machine isolates a run; probed once per process by ``sandbox_capabilities()``."""

    python: str
    unshare_prefix: tuple[str, ...]
    plan: tuple[sandbox_fs.Op, ...] = ()  # the sandbox's root filesystem (sandbox_fs.root_plan)
    uid_separation: bool = False  # root: a throw-away uid per run; else a user namespace, no capabilities
    memory_cgroup: MemoryCgroup | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # negative: killed by that signal; None: timed out or never started
    stdout: str
    stderr: str
    timed_out: bool
    leftovers: int  # processes still alive after the program ended (all killed)
    wall_s: float
    oom_killed: bool = False  # a process of the run exceeded the sandbox's memory cgroup
    setup_error: str | None = None  # the sandbox could not be built: the program did not run


def _fresh_uid() -> int:
    return 1_000_000 + secrets.randbelow(1_000_000_000)


def _probe(cmd: list[str], **kwargs: Any) -> bool:
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"}, **kwargs)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == b"ok"


def _interpreter(python: str | None, as_other_uid: bool) -> str:
    """The first candidate interpreter the sandbox can run (for a throw-away uid its files must be
    world-readable)."""
    uid = _fresh_uid()
    who = {"user": uid, "group": uid, "extra_groups": []} if as_other_uid else {}
    check = ["-I", "-S", "-c", "print('ok')"]
    candidates = [python] if python else [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    interp = next((c for c in candidates if c and os.path.exists(c) and _probe([c, *check], **who)), None)
    if interp is None:
        raise SandboxUnavailable(
            f"no Python interpreter among {candidates} is executable by the sandbox user"
            + (
                f" (uid {uid}: the interpreter and its directories must be world-readable)"
                if as_other_uid
                else ""
            )
            + "; pass the code verifier option python='/usr/bin/python3' or install one system-wide"
        )
    return interp


@functools.cache
def sandbox_capabilities(python: str | None = None) -> SandboxCapabilities:
    """Probe (once per process) how this machine isolates a run; raises ``SandboxUnavailable`` if it cannot."""
    return probe_capabilities(python)


def probe_capabilities(
    python: str | None = None, *, unshare: str | None = "auto", user_namespace: bool | None = None
) -> SandboxCapabilities:
    """Build a sandbox the way this machine allows (plain namespaces as root, a user namespace otherwise),
    check that it runs a program, and return how; raise ``SandboxUnavailable`` saying what failed.

    ``unshare``: the unshare(1) binary ("auto": from PATH; None: as if there were none). ``user_namespace``:
    True/False forces the mode. Also removes the runs that verifiers killed mid-run left behind.
    """
    root = os.geteuid() == 0
    cgroup = find_memory_cgroup()
    remove_stale_runs(cgroup)
    use_userns = (not root) if user_namespace is None else user_namespace
    interp = _interpreter(python, as_other_uid=root and not use_userns)
    plan = tuple(sandbox_fs.root_plan(sandbox_fs.interpreter_layout(interp)))
    unshare = shutil.which("unshare") if unshare == "auto" else unshare
    notes = []
    if cgroup is None:
        notes.append(
            "no writable memory cgroup: memory is limited per process (RLIMIT_AS), so a sandbox may use "
            "up to max_procs * memory_mb in total"
        )
    failures = []
    if unshare is None:
        failures.append("unshare(1) not found (util-linux)")
    else:
        prefix = (
            (unshare, "--user", "--map-root-user", *_NAMESPACES) if use_userns else (unshare, *_NAMESPACES)
        )
        caps = SandboxCapabilities(
            python=interp,
            unshare_prefix=prefix,
            plan=plan,
            uid_separation=root and not use_userns,
            memory_cgroup=cgroup,
            notes=tuple(notes),
        )
        got = _launch(caps, "print('ok')", "", SandboxLimits(wall_s=30.0, cpu_s=30))
        if got.returncode == 0 and got.stdout.strip() == "ok":
            return caps
        failures.append(
            f"{' '.join(prefix)}: {got.setup_error or got.stderr.strip()[-300:] or got.returncode}"
        )
    raise SandboxUnavailable(
        "the code verifier cannot isolate submissions here, so it refuses to run them: it needs Linux "
        "mount, PID and network namespaces (unshare(1) as root, or unprivileged user namespaces) — "
        + "; ".join(failures)
        + ". Run the verifier as root or in a container that allows unshare (e.g. docker --privileged or "
        "a seccomp profile allowing unshare/mount/pivot_root), or enable unprivileged user namespaces "
        "(sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ "
        "kernel.apparmor_restrict_unprivileged_userns=0)."
    )


def remove_stale_runs(cgroup: MemoryCgroup | None = None) -> None:
    """Remove the host folders and cgroups of runs whose verifier process died mid-run (SIGKILL: its
    cleanup never ran; the sandbox itself ended with it). Only those of dead owner pids are touched, so
    concurrent verifiers' runs are safe."""
    cgroup = cgroup or find_memory_cgroup()
    places = [(tempfile.gettempdir(), lambda p: shutil.rmtree(p, ignore_errors=True))]
    if cgroup is not None:
        places.append((cgroup.parent, cgroup.remove))
    for folder, remove in places:
        for path in Path(folder).glob("covrl-sbx-*-*"):
            pid = owner_pid(path.name)
            if pid is not None and not _alive(pid):
                remove(str(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_python(
    source: str,
    *,
    stdin: str = "",
    limits: SandboxLimits = SandboxLimits(),
    python: str | None = None,
    caps: SandboxCapabilities | None = None,
) -> RunResult:
    """Run ``source`` as ``main.py`` in a fresh sandbox; never raises for anything the program does."""
    return _launch(caps or sandbox_capabilities(python), source, stdin, limits)


def _launch(caps: SandboxCapabilities, source: str, stdin: str, limits: SandboxLimits) -> RunResult:
    uid = _fresh_uid() if caps.uid_separation else None
    private = tempfile.mkdtemp(prefix=run_prefix())  # host side, 0700: source, stdin, output, mount stage
    report_r, report_w = os.pipe()
    cgroup = None
    try:
        paths = {n: os.path.join(private, n) for n in ("main.py", "in", "out", "err", "root")}
        os.mkdir(paths["root"])
        with open(paths["main.py"], "w") as f:
            f.write(source)
        with open(paths["in"], "w") as f:
            f.write(stdin)
        if caps.memory_cgroup is not None:
            cgroup = caps.memory_cgroup.create((limits.memory_mb + limits.disk_mb) << 20)
        nproc = limits.max_procs + 1 if uid is not None else _own_process_count() + limits.max_procs
        cfg = {
            "python": caps.python,
            "report_fd": report_w,
            "uid": uid,
            "plan": caps.plan,
            "stage": paths["root"],
            "source": paths["main.py"],
            "sandbox_dir": sandbox_fs.SANDBOX_DIR,
            "work_dir": sandbox_fs.WORK_DIR,
            "temp_dirs": sandbox_fs.TEMP_DIRS,
            "disk_kb": limits.disk_mb << 10,
            "disk_inodes": limits.max_files,
            "cgroup_procs": os.path.join(cgroup, "cgroup.procs") if cgroup else None,
            "rlimits": {
                "RLIMIT_CPU": (limits.cpu_s, limits.cpu_s + 1),
                "RLIMIT_AS": (limits.memory_mb << 20, limits.memory_mb << 20),
                "RLIMIT_NPROC": (nproc, nproc),
                "RLIMIT_FSIZE": (limits.file_size_mb << 20, limits.file_size_mb << 20),
                "RLIMIT_NOFILE": (limits.max_open_files, limits.max_open_files),
                "RLIMIT_CORE": (0, 0),
            },
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": sandbox_fs.WORK_DIR, "LANG": "C.UTF-8"}
        cmd = [*caps.unshare_prefix, caps.python, "-I", "-S", "-c", _BOOT, json.dumps(cfg)]
        start = time.monotonic()
        with (
            open(paths["in"], "rb") as fin,
            open(paths["out"], "wb") as fout,
            open(paths["err"], "wb") as ferr,
        ):
            proc = subprocess.Popen(
                cmd, cwd=private, env=env, stdin=fin, stdout=fout, stderr=ferr,
                start_new_session=True, pass_fds=(report_w,), close_fds=True,
            )  # fmt: skip
        os.close(report_w)
        report_w = -1
        # The boot reports (or its end closes the pipe) the moment the program is done: wait on that
        # instead of Popen.wait(timeout), whose sleep-and-poll loop rounds every run up to its next poll.
        timed_out = not select.select([report_r], [], [], limits.wall_s)[0]
        if timed_out:
            _kill_sandbox(proc)
        else:
            proc.wait()
        wall = time.monotonic() - start
        report = _read_report(report_r)
        status = report.get("status")
        return RunResult(
            returncode=None if timed_out or status is None else os.waitstatus_to_exitcode(int(status)),
            stdout=_read(paths["out"], limits.max_output_bytes),
            stderr=_read(paths["err"], limits.max_output_bytes),
            timed_out=timed_out,
            leftovers=int(report.get("left", 0)),
            wall_s=wall,
            oom_killed=bool(cgroup) and caps.memory_cgroup.oom_killed(cgroup),  # type: ignore[union-attr]
            setup_error=report.get("error"),
        )
    finally:
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
        if cgroup is not None:
            caps.memory_cgroup.remove(cgroup)  # type: ignore[union-attr]
        shutil.rmtree(private, ignore_errors=True)


def _kill_sandbox(proc: subprocess.Popen) -> None:
    """Kill the sandbox and return once every process in it is gone.

    SIGKILL goes to the PID namespace's init (unshare's child) first: unshare's wait for it returns only
    after the kernel has killed and reaped everything else in the namespace (a fork bomb included), so
    nothing outlives this call. Killing unshare first would leave that teardown running behind us.
    """
    import psutil

    try:
        inits = psutil.Process(proc.pid).children()
    except psutil.Error:
        inits = []
    for init in inits:
        try:
            init.kill()
        except psutil.Error:
            pass
    if inits:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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
