"""The ``code`` verifier's sandbox against hostile submissions: each must score 0 with a reason while the
host process, its memory and its files are untouched and nothing is left running.

Which layers hold on this machine is printed by ``sandbox_capabilities()``; tests that need a layer the
machine lacks are skipped with that reason (on the reference box, root + unshare, all run). Where no
sandbox can be built at all the verifier refuses to run code, and this whole module is skipped saying why
(``tests/integration/test_verifiers.py`` checks that refusal). docs/sandbox.md tabulates the cases.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pipeline.data.verifiers import sandbox as sandbox_module
from pipeline.data.verifiers.code import CodeVerifier, extract_program, parse_tests
from pipeline.data.verifiers.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    probe_capabilities,
    run_python,
    sandbox_capabilities,
)

try:
    CAPS = sandbox_capabilities()
except SandboxUnavailable as err:
    pytest.skip(f"the code sandbox cannot be built here: {err}", allow_module_level=True)
needs_uid = pytest.mark.skipif(not CAPS.uid_separation, reason="not root: no throw-away sandbox uid")

LIMITS = SandboxLimits(wall_s=5.0, memory_mb=256, max_procs=8)
ECHO_TESTS = json.dumps({"inputs": ["hunter", "abc\n"], "outputs": ["HUNTER\n", "ABC"]})


@pytest.fixture(scope="module")
def verifier():
    """Short limits, so hostile programs that must be cut off by time end fast."""
    return CodeVerifier(wall_s=2.0, memory_mb=256, max_procs=8, total_wall_s=6.0)


@pytest.fixture(scope="module")
def roomy():
    """The same limits but time: for programs that must finish (or be stopped by something other than the
    clock) even when a loaded machine makes the sandbox's start slow."""
    return CodeVerifier(wall_s=30.0, memory_mb=256, max_procs=8, total_wall_s=60.0)


def _run(verifier, program: str, tests: str = ECHO_TESTS, extra=None):
    return verifier.score(["prompt"], [f"Here you go:\n```python\n{program}\n```"], [tests], [extra or {}])[0]


def _host_snapshot():
    me = psutil.Process()
    return me.memory_info().rss, {c.pid for c in me.children(recursive=True)}


def _sandbox_uid_processes() -> list[int]:
    """Processes running as a throw-away sandbox uid (``code._fresh_uid`` draws them from >= 1e6)."""
    procs = psutil.process_iter(["uids"])
    return [p.pid for p in procs if p.info["uids"] is not None and p.info["uids"].real >= 1_000_000]


def test_correct_and_incorrect_programs(roomy):
    assert _run(roomy, "print(input().upper())").score == 1.0
    wrong = _run(roomy, "print(input())")
    assert wrong.score == 0.0 and wrong.reason == "wrong output on test 0"
    crash = _run(roomy, "raise SystemExit(input() + 1)")
    assert crash.score == 0.0 and "TypeError" in crash.reason
    asserts = {"test_code": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    assert _run(roomy, "def add(a, b):\n    return a + b", json.dumps(asserts)).score == 1.0
    assert _run(roomy, "def add(a, b):\n    return a - b", json.dumps(asserts)).score == 0.0
    # Tests may also come per sample in extras, and partial credit is an option.
    partial = CodeVerifier(wall_s=2.0, partial_credit=True)
    half = partial.score(["p"], ["print('HUNTER')"], [""], [{"tests": ECHO_TESTS}])[0]
    assert half.score == 0.5 and "test 1" in half.reason


def test_parse_tests_and_extract_program():
    assert extract_program("text\n```python\nprint(1)\n```\nmore ```py\nprint(2)\n```") == "print(2)\n"
    assert extract_program("print(3)") == "print(3)"
    assert parse_tests(json.dumps([{"stdin": "1", "stdout": "2"}]))[0].expected_stdout == "2"
    assert parse_tests("assert f(1) == 1")[0].test_code == "assert f(1) == 1"
    with pytest.raises(ValueError, match="same length"):
        parse_tests(json.dumps({"inputs": ["1"], "outputs": []}))


def test_infinite_loop_is_killed_on_time(verifier):
    start = time.monotonic()
    got = _run(verifier, "while True:\n    pass")
    assert got.score == 0.0 and got.reason.startswith("timeout after 2.0 s")
    assert time.monotonic() - start < 5


@needs_uid
def test_fork_bomb_is_contained(verifier):
    got = _run(
        verifier, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    )
    assert got.score == 0.0 and got.reason
    assert _sandbox_uid_processes() == [], "no fork-bomb processes survive"


def test_huge_allocation_fails_inside_the_sandbox(verifier):
    rss_before, _ = _host_snapshot()
    got = _run(verifier, "x = bytearray(10 * 2**30)\nprint(input().upper())")
    assert got.score == 0.0 and "MemoryError" in got.reason
    assert _host_snapshot()[0] - rss_before < 64 << 20, "the host's memory is unaffected"


def _dir_outside_temp() -> str:
    """A writable directory not under /tmp or /var/tmp, so a victim there is not hidden merely by the
    sandbox's private temp dirs. The checkout itself may live under /tmp (CI clones do)."""
    for cand in (os.getcwd(), "/srv", "/opt", str(Path.home())):
        real = os.path.realpath(cand)
        if not real.startswith(("/tmp", "/var/tmp", "/dev/shm")) and os.access(real, os.W_OK):
            return real
    pytest.skip("no writable directory outside the temp dirs")


def test_cannot_write_outside_its_directory(verifier, tmp_path):
    # One victim under /tmp (the test's tmp_path) and one outside any temp dir, both owned by the test.
    outside = Path(tempfile.mkdtemp(prefix=".covrl-victim-", dir=_dir_outside_temp()))
    try:
        victims = [tmp_path / "victim.txt", outside / "victim.txt"]
        for victim in victims:
            victim.write_text("original")
        program = "import os\nfor path in {paths!r}:\n    open(path, 'w').write('pwned')\nprint(input().upper())".format(
            paths=[str(v) for v in victims] + [str(v.parent / "new.txt") for v in victims]
        )
        got = _run(verifier, program)
        assert got.score == 0.0 and ("PermissionError" in got.reason or "FileNotFoundError" in got.reason)
        for victim in victims:
            assert victim.read_text() == "original" and [p.name for p in victim.parent.iterdir()] == [
                "victim.txt"
            ]
    finally:
        shutil.rmtree(outside)


def test_what_it_can_see_is_read_only():
    """The interpreter's own files are in the sandbox (read-only binds of the host's): neither the file nor
    its directory can be changed, whoever the sandbox runs as."""
    program = (
        "import errno, os\n"
        "for path in (os.__file__, os.path.join(os.path.dirname(os.__file__), 'new.py'), '/usr/new', '/new'):\n"
        "    try:\n"
        "        open(path, 'a').write('pwned')\n"
        "        print(path, 'written')\n"
        "    except OSError as err:\n"
        "        print(path, errno.errorcode[err.errno])\n"
        "print(os.__file__)"
    )
    got = run_python(program, limits=LIMITS)
    lines = got.stdout.split("\n")
    host_os = lines[4]
    before = Path(host_os).read_bytes()
    assert got.returncode == 0 and lines[0].startswith(host_os), got
    assert all(line.rsplit(" ", 1)[1] in ("EROFS", "EACCES") for line in lines[:4]), got
    assert Path(host_os).read_bytes() == before and not Path(host_os).with_name("new.py").exists()


def test_cannot_read_parent_secrets(roomy, monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("COVRL_TEST_SECRET", secret)
    program = (
        "import os\n"
        "found = os.environ.get('COVRL_TEST_SECRET', '')\n"
        f"for pid in ({os.getpid()}, os.getppid(), 1):\n"
        "    try:\n"
        "        found = found or ('s3cret' in open(f'/proc/{pid}/environ').read() and 'leaked') or ''\n"
        "    except OSError:\n"
        "        pass\n"
        "print(found or 'nothing')"
    )
    tests = json.dumps({"inputs": [""], "outputs": [secret]})
    got = _run(roomy, program, tests)
    assert got.score == 0.0 and got.reason == "wrong output on test 0"
    # Control: the same program sees what it is given on stdin, so the check above is meaningful.
    assert _run(roomy, "print('nothing')", json.dumps({"inputs": [""], "outputs": ["nothing"]})).score == 1.0


def test_no_network_even_to_localhost(verifier):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    program = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "s.sendall(b'exfiltrated')\n"
        "print('connected')"
    )
    try:
        got = _run(verifier, program, json.dumps({"inputs": [""], "outputs": ["connected"]}))
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert got.score == 0.0 and ("unreachable" in got.reason or "refused" in got.reason.lower())


def test_background_process_does_not_outlive_the_verifier(verifier):
    marker = f"covrl-marker-{uuid.uuid4().hex}"
    program = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "print(input().upper())"
    )
    _, children_before = _host_snapshot()
    got = _run(verifier, program)
    assert got.score == 0.0 and "process(es) running" in got.reason
    time.sleep(0.2)
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in (proc.info["cmdline"] or []):
            leftovers.append(proc.pid)
    assert leftovers == [], "the double-forked sleeper is gone"
    assert _sandbox_uid_processes() == []
    assert _host_snapshot()[1] <= children_before


def test_shared_temp_dirs_are_private(roomy):
    name = f"covrl-marker-{uuid.uuid4().hex}"
    program = f"for d in ('/tmp', '/var/tmp', '/dev/shm'):\n    open(d + '/{name}', 'w').write('x')\nprint(input().upper())"
    assert _run(roomy, program).score == 1.0  # writing there works, but only in the sandbox's own tmpfs
    assert not any(os.path.exists(f"{d}/{name}") for d in ("/tmp", "/var/tmp", "/dev/shm"))


# ------------------------------------------------------------------------------ what the sandbox contains

ANSWERS = '{"prompt": "2 3", "ground_truth": "5", "answer_key": "covrl-secret-answers"}\n'


def _modes():
    """The default sandbox, and (as root, where it works) the user-namespace mode a non-root user gets."""
    modes = [pytest.param(CAPS, id="default")]
    if os.geteuid() == 0:
        try:
            modes.append(pytest.param(probe_capabilities(user_namespace=True), id="user_namespace"))
        except SandboxUnavailable as err:
            modes.append(pytest.param(None, id="user_namespace", marks=pytest.mark.skip(reason=str(err))))
    return modes


@pytest.mark.parametrize("caps", _modes())
def test_cannot_read_host_files(caps, tmp_path):
    """Reward hacking by reading the answers: /etc/passwd, the project's source and tests, and a dataset
    with the answers (world-readable, both outside and under /tmp) must not exist for the program."""
    outside = Path(tempfile.mkdtemp(prefix=".covrl-data-", dir=_dir_outside_temp()))
    try:
        outside.chmod(0o755)
        targets = [outside / "answers.jsonl", tmp_path / "answers.jsonl"]
        for target in targets:
            target.write_text(ANSWERS)
            target.chmod(0o644)
        tmp_path.chmod(0o755)
        paths = ["/etc/passwd", __file__, str(Path(sandbox_module.__file__)), *map(str, targets)]
        program = (
            "import sys\n"
            f"for path in {paths!r}:\n"
            "    try:\n"
            "        print(path, 'READ', len(open(path).read()))\n"
            "    except OSError as err:\n"
            "        print(path, type(err).__name__)\n"
        )
        got = run_python(program, limits=LIMITS, caps=caps)
        assert got.returncode == 0, got
        assert got.stdout.splitlines() == [f"{p} FileNotFoundError" for p in paths]
    finally:
        shutil.rmtree(outside)


@pytest.mark.parametrize("caps", _modes())
def test_only_the_interpreter_and_its_stdlib_are_visible(caps):
    """Every file the program can find is one the sandbox put there on purpose: the interpreter's files
    (read-only binds listed in the capabilities' plan), device nodes, and its own main.py."""
    program = (
        "import json, os\n"
        "seen = []\n"
        "for top, dirs, files in os.walk('/'):\n"
        "    if top == '/proc':\n"
        "        dirs[:] = []\n"
        "        continue\n"
        "    seen += [os.path.join(top, f) for f in files]\n"
        "print(json.dumps(seen))\n"
    )
    got = run_python(program, limits=LIMITS, caps=caps)
    assert got.returncode == 0, got
    seen = json.loads(got.stdout)
    binds = [op[1] for op in caps.plan if op[0] == "bind"]
    allowed = [b for b in binds if not os.path.isdir(b)]
    allowed_dirs = [b.rstrip("/") + "/" for b in binds if os.path.isdir(b)]
    stray = [
        f
        for f in seen
        if f not in allowed and not f.startswith(tuple(allowed_dirs)) and f != "/sandbox/work/main.py"
        and not (os.path.islink(f) and any(op[:2] == ("symlink", f) for op in caps.plan))
    ]  # fmt: skip
    assert "/sandbox/work/main.py" in seen and any(f.endswith("/os.py") for f in seen)
    assert stray == []
    assert not any("site-packages" in f or "dist-packages" in f for f in seen), "no third-party packages"


@pytest.mark.parametrize("caps", _modes())
def test_cannot_forge_its_report(caps):
    """The sandbox's PID 1 reports the program's exit status through a pipe. A program that writes a
    report prefix into that pipe (via /proc/1/fd) would turn PID 1's real report into a nested value of
    its own "exit 0" one; PID 1 is not dumpable, so its descriptors are out of reach."""
    program = (
        "import os, sys\n"
        "for n in range(3, 16):\n"
        "    try:\n"
        "        with open(f'/proc/1/fd/{n}', 'w') as f:\n"
        '            f.write(\'{"status": 0, "left": 0, "x": \')\n'
        "        print('forged', n, flush=True)\n"
        "    except OSError:\n"
        "        pass\n"
        "sys.exit(3)\n"
    )
    got = run_python(program, limits=LIMITS, caps=caps)
    assert got.returncode == 3 and "forged" not in got.stdout, got


def _world_writable_host_dirs() -> list[str]:
    """Directories on this host any user may create files in (sticky /tmp-like ones included)."""
    out = []
    for top, dirs, _ in os.walk("/"):
        depth = top.count("/") if top != "/" else 0
        if top in ("/proc", "/sys") or depth >= 3 or top.startswith(("/tmp/", "/var/tmp/", "/dev/shm/")):
            dirs[:] = []
        try:
            if os.stat(top).st_mode & 0o002 and not os.path.islink(top):
                out.append(top)
        except OSError:
            pass
    return out


def test_no_writable_path_is_shared_with_the_host():
    """The program tries every world-writable directory of the host (e.g. /run/lock, sticky and shared by
    every user) and every directory it can see; whatever it manages to write must be private to the run
    and gone afterwards."""
    shared = _world_writable_host_dirs()
    assert "/tmp" in shared
    marker = f"covrl-marker-{uuid.uuid4().hex}"
    program = (
        "import json, os\n"
        f"dirs = {shared!r}\n"
        "for top, subdirs, _ in os.walk('/'):\n"
        "    if top == '/proc':\n"
        "        subdirs[:] = []\n"
        "    dirs.append(top)\n"
        "wrote = []\n"
        "for d in dirs:\n"
        "    try:\n"
        f"        open(os.path.join(d, {marker!r}), 'w').write('x')\n"
        "        wrote.append(d)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(json.dumps(wrote))\n"
    )
    got = run_python(program, limits=LIMITS)
    assert got.returncode == 0, got
    wrote = json.loads(got.stdout)
    private = ("/sandbox", "/tmp", "/var/tmp", "/dev/shm")  # the run's tmpfs, mounted at each of these
    assert "/sandbox/work" in wrote and "/tmp" in wrote
    assert [d for d in wrote if not any(d == p or d.startswith(p + "/") for p in private)] == []
    assert [d for d in shared if os.path.exists(os.path.join(d, marker))] == []


def _sysv_segments() -> set[str]:
    with open("/proc/sysvipc/shm") as f:
        return {line.split()[1] for line in f.readlines()[1:]}


def test_ipc_objects_are_private_and_removed():
    """A System V shared-memory segment outlives its creator on the host (until someone removes it): the
    sandbox's are made in its own IPC namespace and vanish with it."""
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "shmid = libc.shmget(0, 1 << 20, 0o1666)  # IPC_PRIVATE, IPC_CREAT | 0666\n"
        "print('created' if shmid >= 0 else 'refused')\n"
    )
    before = _sysv_segments()
    got = run_python(program, limits=LIMITS)
    assert got.stdout.strip() == "created", got
    assert _sysv_segments() - before == set()


def test_total_disk_use_is_bounded():
    """Many files, each under the per-file limit (8 MiB), must not add up past the run's disk_mb, and
    neither may a flood of empty files."""
    program = (
        "import os\n"
        "chunk, written = b'x' * (1 << 20), 0\n"
        "try:\n"
        "    for i in range(40):\n"
        "        with open(('/tmp/' if i % 2 else '') + f'f{i}', 'wb') as f:\n"
        "            for _ in range(8):\n"
        "                f.write(chunk)\n"
        "                f.flush()\n"
        "                written += 1\n"
        "except OSError as err:\n"
        "    print('stopped', err.strerror)\n"
        "print(written)\n"
        "files = 0\n"
        "try:\n"
        "    for i in range(100000):\n"
        "        open(f'/tmp/e{i}', 'w').close()\n"
        "        files += 1\n"
        "except OSError as err:\n"
        "    print('stopped', err.strerror)\n"
        "print(files)\n"
    )
    limits = SandboxLimits(wall_s=20.0, cpu_s=20, memory_mb=256, disk_mb=32, max_files=256)
    got = run_python(program, limits=limits)
    lines = got.stdout.splitlines()
    assert got.returncode == 0 and lines[0] == "stopped No space left on device", got
    assert 24 <= int(lines[1]) <= 32, "it wrote until the run's 32 MiB were used, and no further"
    assert lines[2] == "stopped No space left on device" and int(lines[3]) < 256


@pytest.mark.skipif(CAPS.memory_cgroup is None, reason=f"no writable memory cgroup: {CAPS.notes}")
def test_memory_is_bounded_for_the_whole_sandbox(roomy):
    """Four processes of 150 MiB each stay under a 256 MiB per-process limit but must not hold 600 MiB
    together: the sandbox's cgroup (256 + 64 MiB) kills one, and the sample scores 0 saying why."""
    program = (
        "import os, select, time\n"
        "ready_r, ready_w = os.pipe()\n"
        "go_r, go_w = os.pipe()\n"
        "kids = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os.close(go_w)\n"
        "        block = b'x' * (150 << 20)  # touched: resident\n"
        "        os.write(ready_w, b'1')\n"
        "        os.read(go_r, 1)  # hold it until the parent has seen every child ready\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "ready = 0\n"
        "while ready < 4:\n"
        "    if select.select([ready_r], [], [], 0.05)[0]:\n"
        "        ready += len(os.read(ready_r, 4))\n"
        "    done, status = os.waitpid(-1, os.WNOHANG)\n"
        "    if done:\n"
        "        print('a child was killed' if os.WIFSIGNALED(status) else 'a child exited', flush=True)\n"
        "        break\n"
        "else:\n"
        "    print('all 4 held 150 MiB at once', flush=True)\n"
        "os.close(go_w)\n"
        "for pid in kids:\n"
        "    try:\n"
        "        os.waitpid(pid, 0)\n"
        "    except ChildProcessError:\n"
        "        pass\n"
    )
    tests = json.dumps({"inputs": [""], "outputs": ["all 4 held 150 MiB at once"]})
    got = _run(roomy, program, tests)
    assert got.score == 0.0 and got.reason.startswith("out of memory on test 0"), got


PYENV = Path(sys.base_prefix) / "bin" / "python3"  # an interpreter whose site-packages lie in its stdlib dir


@pytest.mark.skipif(
    os.geteuid() != 0
    or not (Path(sys.base_prefix) / "lib" / f"python{sys.version[:4]}" / "site-packages").is_dir(),
    reason="needs root (user namespace over a root-only interpreter) and a stdlib dir holding site-packages",
)
def test_site_packages_inside_the_stdlib_dir_are_hidden():
    """pyenv-style layouts keep site-packages (pytest, numpy, ...) inside the standard library's directory,
    which the sandbox binds whole: that folder is covered by an empty mount."""
    caps = probe_capabilities(python=str(PYENV), user_namespace=True)
    site = Path(sys.base_prefix) / "lib" / f"python{sys.version[:4]}" / "site-packages"
    assert ("hide", str(site.resolve())) in caps.plan
    program = (
        "import os, sys\n"
        f"print(os.listdir({str(site)!r}))\n"
        "try:\n"
        "    import pytest\n"
        "    print('imported pytest')\n"
        "except ImportError:\n"
        "    print('no pytest')\n"
        "import json, sqlite3, ssl\n"
        "print('stdlib ok')\n"
    )
    got = run_python(program, limits=LIMITS, caps=caps)
    assert got.stdout.splitlines() == ["[]", "no pytest", "stdlib ok"], got


def _runs_main(proc: psutil.Process) -> bool:
    try:
        return proc.cmdline()[-2:] == ["-I", "main.py"]
    except psutil.Error:  # gone, or a zombie, meanwhile
        return False


def test_a_killed_verifier_takes_its_sandbox_with_it():
    """A verifier process killed mid-run (e.g. its Ray actor killed) must not leave the submission running:
    a program that sleeps for an hour would otherwise live on, unwatched. The run's host-side folder and
    cgroup are removed by the next sandbox probe (as when a verifier worker starts)."""
    start = (
        "from pipeline.data.verifiers.sandbox import SandboxLimits, run_python, sandbox_capabilities\n"
        "sandbox_capabilities()\n"
        "print('probed', flush=True)\n"
        "run_python('import time\\ntime.sleep(3600)', limits=SandboxLimits(wall_s=3600, cpu_s=3600))\n"
    )
    root = Path(__file__).resolve().parents[2]
    verifier = subprocess.Popen(
        [sys.executable, "-c", start],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
        stdout=subprocess.PIPE,
        text=True,
    )
    sandboxed: list[psutil.Process] = []
    try:
        assert verifier.stdout.readline() == "probed\n"  # its probe run is over: the next one is ours
        deadline = time.monotonic() + 120
        while not sandboxed and time.monotonic() < deadline:  # wait until the program runs
            time.sleep(0.1)
            sandboxed = [p for p in psutil.Process(verifier.pid).children(recursive=True) if _runs_main(p)]
        assert sandboxed, "the sandboxed program started"
        runs = [p for p in Path(tempfile.gettempdir()).glob(f"covrl-sbx-{verifier.pid}-*")]
        assert len(runs) == 1
        verifier.kill()
        verifier.wait()
        _, alive = psutil.wait_procs(sandboxed, timeout=30)
        assert alive == [], "the sandbox ended with its verifier"
        sandbox_module.remove_stale_runs()
        assert not runs[0].exists()
        if CAPS.memory_cgroup is not None:
            assert list(Path(CAPS.memory_cgroup.parent).glob(f"covrl-sbx-{verifier.pid}-*")) == []
    finally:
        for proc in sandboxed:
            try:
                proc.kill()
            except psutil.Error:
                pass
        verifier.kill()
