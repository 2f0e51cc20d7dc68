#!/usr/bin/env bash
# Submit a covrl training run to a Ray cluster as a Ray job (`ray job submit` with a runtime_env).
#
#   deploy/submit.sh [options] [-- TRAIN_ARGS...]
#
# TRAIN_ARGS go to `python -m pipeline.train` (e.g. --config configs/presets/qwen2.5-7b-kl-cov.yaml
# --set schedule.steps=100). submit.sh always adds `--set ray.address=auto` (the driver joins the
# cluster it runs on) and, unless TRAIN_ARGS set run_dir or use --resume, an absolute
# `--set run_dir=<this checkout>/runs/{name}-{timestamp}`, so results land outside the job's temporary
# copy of the code (on a remote cluster that path must be on storage the cluster nodes share; pass
# your own `--set run_dir=/shared/...` there).
#
# The working directory (default: the repository root) is uploaded; .gitignore'd paths and these
# excludes stay behind: .venv runs .git .cache __pycache__ checkpoints *.safetensors *.pt .pytest_cache
# .ruff_cache .hypothesis *.egg-info (Ray refuses packages over ~512 MiB and warns from half that).
#
# Options:
#   --address URL       job API of the cluster (default: $RAY_ADDRESS if it is an http(s) URL, else
#                       http://127.0.0.1:8265); on a remote cluster use an SSH tunnel / private address
#   --no-wait           submit, print the job id and how to follow it, return at once
#   --pip REQ           pip packages for the job's runtime_env: a requirements file, or a
#                       comma/space separated list ("my-verifiers==1.2, sympy")
#   --py-module PATH    a local package dir or wheel shipped with the job (runtime_env py_modules),
#                       e.g. your own verifier package (repeatable)
#   --env NAME[=VALUE]  environment variable for the job (NAME alone: its value here); repeatable.
#                       Passed through when set here: HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HF_HOME
#                       HF_ENDPOINT COVRL_CACHE VLLM_CPU_KVCACHE_SPACE
#   --exclude PATTERN   one more upload exclude (gitignore syntax; repeatable)
#   --working-dir DIR   upload DIR instead of the repository root
#   --submission-id ID  job id (default: covrl-<timestamp>-<random>)
#   --python CMD        interpreter on the cluster (default: python)
#   --token-file PATH   Ray auth token for the job API (sets RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH)
#   --dry-run           print the runtime_env, the entrypoint and the upload size; submit nothing
#
# Auth (Ray 2.60 token authentication): a cluster started with RAY_AUTH_MODE=token (or with a token in
# ~/.ray/auth_token) rejects job API calls without the token (HTTP 401/403). The submitter needs
# RAY_AUTH_MODE=token plus the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); when
# RAY_AUTH_MODE is unset and one of those exists, submit.sh sets RAY_AUTH_MODE=token for you.
#
# Exit status: 0 when the job SUCCEEDED (or was submitted, with --no-wait), 1 when it FAILED or was
# STOPPED, 2 on bad usage.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${COVRL_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
RAY="$(dirname "$PY")/ray"
[[ -x "$RAY" ]] || RAY="$(command -v ray)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "submit: $*" >&2; exit 2; }

ADDRESS=""
WAIT=1
PIP=""
PY_MODULES=()
ENVS=()
EXCLUDES=()
WORKDIR="$REPO"
SUBMISSION_ID=""
CLUSTER_PY=python
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --no-wait) WAIT=0; shift ;;
    --pip) PIP="$2"; shift 2 ;;
    --py-module) PY_MODULES+=("$2"); shift 2 ;;
    --env) ENVS+=("$2"); shift 2 ;;
    --exclude) EXCLUDES+=("$2"); shift 2 ;;
    --working-dir) WORKDIR="$(cd "$2" && pwd)"; shift 2 ;;
    --submission-id) SUBMISSION_ID="$2"; shift 2 ;;
    --python) CLUSTER_PY="$2"; shift 2 ;;
    --token-file) [[ -f "$2" ]] || die "--token-file $2: no such file"
                  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (train arguments go after --; see --help)" ;;
  esac
done
TRAIN_ARGS=("$@")

if [[ -z "$ADDRESS" ]]; then
  case "${RAY_ADDRESS:-}" in
    http://*|https://*) ADDRESS="$RAY_ADDRESS" ;;
    *) ADDRESS="http://127.0.0.1:8265" ;;
  esac
fi

if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }; then
  export RAY_AUTH_MODE=token  # harmless against a cluster without auth: the header is then ignored
fi

# The driver always joins the cluster it is started on; results go to an absolute path.
has_run_dir=0
prev=""
for a in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do
  case "$a" in
    --resume|--resume=*) has_run_dir=1 ;;
    --set=run_dir=*) has_run_dir=1 ;;
    run_dir=*) [[ "$prev" == --set ]] && has_run_dir=1 ;;
  esac
  prev="$a"
done
ENTRY=("$CLUSTER_PY" -m pipeline.train --set ray.address=auto)
if [[ $has_run_dir -eq 0 ]]; then
  ENTRY+=(--set "run_dir=$REPO/runs/{name}-{timestamp}")
fi
ENTRY+=("${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")

if [[ -z "$SUBMISSION_ID" ]]; then
  SUBMISSION_ID="covrl-$(date +%Y%m%d-%H%M%S)-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
fi

# Build the runtime_env (and measure what Ray will upload) in Python: JSON quoting, pip parsing, and
# Ray's own packager (it applies .gitignore and the excludes exactly as the upload will).
RUNTIME_ENV_FILE="$(mktemp)"
INPUTS_FILE="$(mktemp)"
trap 'rm -f "$RUNTIME_ENV_FILE" "$INPUTS_FILE"' EXIT
{
  printf '%s\n' "$WORKDIR" "$PIP"
  printf 'MOD\t%s\n' "${PY_MODULES[@]+"${PY_MODULES[@]}"}"
  printf 'ENV\t%s\n' "${ENVS[@]+"${ENVS[@]}"}"
  printf 'EXC\t%s\n' "${EXCLUDES[@]+"${EXCLUDES[@]}"}"
} > "$INPUTS_FILE"
"$PY" - "$RUNTIME_ENV_FILE" "$INPUTS_FILE" <<'EOF'
import json, os, re, sys, tempfile
from pathlib import Path

lines = Path(sys.argv[2]).read_text().split("\n")
workdir, pip = lines[0], lines[1].strip()
mods = [l[4:] for l in lines[2:] if l.startswith("MOD\t") and l[4:]]
envs = [l[4:] for l in lines[2:] if l.startswith("ENV\t") and l[4:]]
extra_exc = [l[4:] for l in lines[2:] if l.startswith("EXC\t") and l[4:]]

excludes = [".venv", "runs", ".git", ".cache", "__pycache__", "checkpoints", "*.safetensors", "*.pt",
            ".pytest_cache", ".ruff_cache", ".hypothesis", "*.egg-info"] + extra_exc
env_vars = {
    # pipeline.train passes HF_HUB_OFFLINE to its actors through ray.init(runtime_env=...); a job
    # runtime_env that sets the same variable would conflict unless the driver's env may override it.
    "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
}
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_ENDPOINT", "COVRL_CACHE", "VLLM_CPU_KVCACHE_SPACE"):
    if name in os.environ:
        env_vars[name] = os.environ[name]
for item in envs:
    name, eq, value = item.partition("=")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        sys.exit(f"submit: --env {item!r}: expected NAME or NAME=VALUE")
    if not eq:
        if name not in os.environ:
            sys.exit(f"submit: --env {name}: not set in this environment (use --env {name}=VALUE)")
        value = os.environ[name]
    env_vars[name] = value

runtime_env = {"working_dir": workdir, "excludes": excludes, "env_vars": env_vars}
if pip:
    if Path(pip).is_file():
        runtime_env["pip"] = {"packages": [l.strip() for l in Path(pip).read_text().splitlines()
                                           if l.strip() and not l.lstrip().startswith("#")]}
    else:
        runtime_env["pip"] = {"packages": [p for p in re.split(r"[,\s]+", pip) if p]}
if mods:
    for m in mods:
        if not Path(m).exists():
            sys.exit(f"submit: --py-module {m}: no such file or directory")
    runtime_env["py_modules"] = [str(Path(m).resolve()) for m in mods]

# Upload size, measured with Ray's own packager.
from ray._private.runtime_env.packaging import _zip_files
include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "pkg.zip"
    _zip_files(workdir, excludes, str(out), include_gitignore=include_gitignore)
    import zipfile
    with zipfile.ZipFile(out) as z:
        n_files = len(z.namelist())
    size = out.stat().st_size
print(f"upload: {workdir} -> {size / 2**20:.2f} MiB zipped, {n_files} files "
      f"(.gitignore {'respected' if include_gitignore else 'IGNORED'}; excludes: {' '.join(excludes)})")
if size > 100 * 2**20:
    print("submit: WARNING: the upload is over 100 MiB; add --exclude patterns for large files", file=sys.stderr)
Path(sys.argv[1]).write_text(json.dumps(runtime_env))
EOF

echo "runtime_env: $(cat "$RUNTIME_ENV_FILE")"
echo "entrypoint: $(printf '%q ' "${ENTRY[@]}")"
if [[ $DRY -eq 1 ]]; then
  echo "(dry run: nothing submitted to $ADDRESS)"
  exit 0
fi

"$RAY" job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" \
  --runtime-env-json "$(cat "$RUNTIME_ENV_FILE")" --no-wait -- "${ENTRY[@]}" > /dev/null
echo "submission_id: $SUBMISSION_ID"
echo "follow:  RAY_ADDRESS=$ADDRESS $RAY job logs -f $SUBMISSION_ID"
echo "status:  RAY_ADDRESS=$ADDRESS $RAY job status $SUBMISSION_ID"
echo "stop:    RAY_ADDRESS=$ADDRESS $RAY job stop $SUBMISSION_ID"
if [[ $WAIT -eq 0 ]]; then
  exit 0
fi

# Follow the logs to the end, then report the final status.
"$RAY" job logs --address "$ADDRESS" --follow "$SUBMISSION_ID" || true
# The final status from the job API (the CLI prints it only as prose); waits while it is not terminal.
status=$("$PY" - "$ADDRESS" "$SUBMISSION_ID" 2>/dev/null <<'EOF' || echo UNKNOWN
import sys, time
from ray.job_submission import JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
deadline = time.monotonic() + 120
while True:
    status = client.get_job_status(sys.argv[2])
    if status.is_terminal() or time.monotonic() > deadline:
        break
    time.sleep(1)
print(status.value)
EOF
)
echo "job $SUBMISSION_ID: $status"
[[ "$status" == SUCCEEDED ]] || exit 1
