"""scripts/gpu_check.sh without a GPU: it stops at once, says why, exits non-zero and installs nothing."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_check(tmp_path: Path, smi: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, NVIDIA_SMI=smi, COVRL_GPU_VENV=str(tmp_path / "venv"), COVRL_GPU_CHECK_DIR=str(tmp_path)
    )
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("case", ["no_smi", "no_device"])
def test_gpu_check_exits_at_once_without_a_gpu(tmp_path, case):
    if case == "no_smi":
        smi, reason = str(tmp_path / "nvidia-smi-absent"), "not found"
    else:  # the driver tool is there but sees no device (what nvidia-smi prints on a GPU-less VM)
        fake = tmp_path / "nvidia-smi"
        fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
        fake.chmod(0o755)
        smi, reason = str(fake), "lists no device"
    res = run_check(tmp_path, smi)
    assert res.returncode == 3, res.stderr
    assert "no NVIDIA GPU" in res.stderr and reason in res.stderr
    assert "PASS" not in res.stdout and not (tmp_path / "venv").exists()
