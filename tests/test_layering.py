"""Layering: the pure modules (schemas, pipeline math) must not pull in Ray, vLLM or DeepSpeed."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import schemas

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    "pipeline.core.logprobs",
    "pipeline.core.advantages",
    "pipeline.core.losses",
    "pipeline.core.entropy_dynamics",
    "pipeline.core.law",
    "pipeline.core.recipe",
    "pipeline.analysis.study",
    "pipeline.core.ppo_update",
    "pipeline.core.model_forward",
    "pipeline.core.entropy_probe",
    "pipeline.core.pass_at_k",
    *(f"schemas.{m.name}" for m in pkgutil.iter_modules(schemas.__path__)),
]
HEAVY = ("ray", "vllm", "deepspeed")


def test_pure_modules_import_no_heavy_frameworks():
    code = (
        "import importlib, json, sys\n"
        f"for m in {PURE!r}: importlib.import_module(m)\n"
        f"print(json.dumps([h for h in {HEAVY!r} if h in sys.modules or any(k.startswith(h + '.') for k in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert "schemas.config" in PURE
