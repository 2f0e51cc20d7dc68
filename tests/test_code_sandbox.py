"""The ``code`` verifier's sandbox against hostile submissions: each must score 0 with a reason while the
host process, its memory and its files are untouched and nothing is left running.

Which layers hold on this machine is printed by ``sandbox_capabilities()``; tests that need a layer the
machine lacks are skipped with that reason (on the reference box, root + unshare, all run).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from pipeline.verifiers.code import CodeVerifier, extract_program, parse_tests, sandbox_capabilities

CAPS = sandbox_capabilities()
needs_net_ns = pytest.mark.skipif(not CAPS.net_isolated, reason=f"no network namespace here: {CAPS.notes}")
needs_uid = pytest.mark.skipif(not CAPS.uid_separation, reason="not root: no throw-away sandbox uid")

ECHO_TESTS = json.dumps({"inputs": ["hunter", "abc\n"], "outputs": ["HUNTER\n", "ABC"]})


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(wall_s=2.0, memory_mb=256, max_procs=8, total_wall_s=6.0)


def _run(verifier, program: str, tests: str = ECHO_TESTS, extra=None):
    return verifier.score(["prompt"], [f"Here you go:\n```python\n{program}\n```"], [tests], [extra or {}])[0]


def _host_snapshot():
    me = psutil.Process()
    return me.memory_info().rss, {c.pid for c in me.children(recursive=True)}


def _sandbox_uid_processes() -> list[int]:
    """Processes running as a throw-away sandbox uid (``code._fresh_uid`` draws them from >= 1e6)."""
    procs = psutil.process_iter(["uids"])
    return [p.pid for p in procs if p.info["uids"] is not None and p.info["uids"].real >= 1_000_000]


def test_correct_and_incorrect_programs(verifier):
    assert _run(verifier, "print(input().upper())").score == 1.0
    wrong = _run(verifier, "print(input())")
    assert wrong.score == 0.0 and wrong.reason == "wrong output on test 0"
    crash = _run(verifier, "raise SystemExit(input() + 1)")
    assert crash.score == 0.0 and "TypeError" in crash.reason
    asserts = {"test_code": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"}
    assert _run(verifier, "def add(a, b):\n    return a + b", json.dumps(asserts)).score == 1.0
    assert _run(verifier, "def add(a, b):\n    return a - b", json.dumps(asserts)).score == 0.0
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


@needs_uid
def _dir_outside_temp() -> str:
    """A writable directory not under /tmp or /var/tmp (the sandbox hides those behind its own tmpfs), so
    the victim is visible to the sandboxed program and only the throw-away uid can protect it. The
    checkout itself may live under /tmp (CI clones do)."""
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
        # The victim outside /tmp is visible to the sandbox: only the throw-away uid protects it.
        program = f"open({str(victims[1])!r}, 'w').write('pwned')"
        denied = _run(verifier, program)
        assert "PermissionError" in denied.reason and victims[1].read_text() == "original"
    finally:
        shutil.rmtree(outside)


def test_cannot_read_parent_secrets(verifier, monkeypatch):
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
    got = _run(verifier, program, tests)
    assert got.score == 0.0 and got.reason == "wrong output on test 0"
    # Control: the same program sees what it is given on stdin, so the check above is meaningful.
    assert (
        _run(verifier, "print('nothing')", json.dumps({"inputs": [""], "outputs": ["nothing"]})).score == 1.0
    )


@needs_net_ns
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


@pytest.mark.skipif(not (CAPS.uid_separation and CAPS.pid_namespace), reason="needs root + namespaces")
def test_shared_temp_dirs_are_private(verifier):
    name = f"covrl-marker-{uuid.uuid4().hex}"
    program = f"for d in ('/tmp', '/var/tmp', '/dev/shm'):\n    open(d + '/{name}', 'w').write('x')\nprint(input().upper())"
    assert _run(verifier, program).score == 1.0  # writing there works, but only in the sandbox's own tmpfs
    assert not any(os.path.exists(f"{d}/{name}") for d in ("/tmp", "/var/tmp", "/dev/shm"))
