"""Learner start-up never waits forever: a JIT-extension build lock left by a killed start (DeepSpeed's CPU
communication op, compiled by the first learner on a machine) fails the start after
``learner.start_timeout_s``, naming the lock file and how to clear it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_START = """
from actors.learner import Learner
from schemas.run_config import AlgorithmConfig, LearnerConfig

Learner(LearnerConfig(start_timeout_s=1.0), AlgorithmConfig(), "unused-model-path", master_port=29555)
"""


def test_a_stale_extension_build_lock_fails_the_start_naming_the_lock(tmp_path):
    # A real DeepSpeed learner, with torch's extension folder moved to a temp dir that holds the lock file
    # a killed build leaves behind (torch's FileBaton: an empty "lock" file in the extension's build dir).
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", _START], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("actors.learner.LearnerStartError: learner: waited 1 s (learner.start_timeout_s)")
    assert f"rm {lock}" in last and "scripts/setup.sh" in last
    assert lock.exists(), "the lock is not removed behind the user's back (another process may hold it)"


def test_setup_builds_the_op_once_and_then_returns_at_once(tmp_path):
    """scripts/setup.sh on an installed checkout (stamp matches) without a recorded op builds it (a no-op
    compile where it is already built) and records the library; the next run does nothing; a record
    whose library is gone builds again."""
    import shutil

    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for pkg in ("actors", "schemas", "pipeline"):
        (tmp_path / pkg).symlink_to(ROOT / pkg)
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    stamp = subprocess.run(
        "echo \"$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-cpu\"",
        shell=True, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (venv / ".covrl-stamp").write_text(stamp)

    def setup() -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run(
            ["bash", "scripts/setup.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )

    first = setup()
    assert first.returncode == 0 and "building DeepSpeed's CPU communication op" in first.stderr, first.stderr
    op = (venv / ".covrl-ops").read_text().strip()
    assert op.endswith(".so") and Path(op).is_file()
    again = setup()
    assert again.returncode == 0 and again.stderr == "" and again.stdout == ""
    (venv / ".covrl-ops").write_text(str(tmp_path / "gone.so") + "\n")
    rebuilt = setup()
    assert rebuilt.returncode == 0 and (venv / ".covrl-ops").read_text().strip() == op
