#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, on loopback, for tests and local experiments.
#
#   deploy/local-cluster.sh start  [--workers N] [--worker-resources JSON]... [options]
#   deploy/local-cluster.sh stop   [--state-dir DIR]
#   deploy/local-cluster.sh status [--state-dir DIR] [--json]
#   deploy/local-cluster.sh env    [--state-dir DIR]    # `eval "$(deploy/local-cluster.sh env)"` before submitting
#   deploy/local-cluster.sh pids   [--state-dir DIR]    # every live process this cluster started
#
# `start` launches one head and N worker "nodes" (each its own raylet), each as `ray start --block` in its
# own process group (setsid), each with its own --temp-dir inside the state dir (n0 the head, n1.. the
# workers), on custom ports so it never collides with another Ray on the machine. Separate temp dirs matter:
# a node's runtime_resources (the unpacked working_dir of a job) lives there, and a node that deletes or
# re-unpacks a package must not pull files from under a process of another node, as it never can across
# real machines. The i-th worker gets the i-th --worker-resources JSON
# (default: {"gen_node": 1}, {"learn_node": 1}, {"verify_node": 1}, repeating). PIDs, ports, the auth
# token and the node list are written into the state dir. `stop` kills exactly those process groups and
# every process that descends from them (the job drivers Ray starts in their own sessions included) —
# never `ray stop`, which would kill every Ray on the machine.
#
# Options of start:
#   --workers N                 worker nodes (default 2, or the number of --worker-resources given)
#   --worker-resources JSON     custom resources of the next worker, e.g. '{"gen_node": 1}' (repeatable)
#   --head-cpus N               CPUs the head advertises (default 2; drivers and unpinned roles land there)
#   --worker-cpus N             CPUs each worker advertises (default 1)
#   --worker-gpus N             GPUs each worker advertises (default 0)
#   --port P                    GCS port of the head (default 6390)
#   --dashboard-port P          dashboard / job API port (default 8275)
#   --port-base B               first of the per-node ports (default 27800; node i uses B+10i .. B+10i+6)
#   --object-store-mb M         object store per node (default 512)
#   --no-auth                   RAY_AUTH_MODE=disabled (default: token auth with a fresh token in the state dir)
#   --timeout S                 seconds to wait for all nodes (default 120)
# Common option: --state-dir DIR (default $COVRL_CLUSTER_DIR or /tmp/covrl-cluster-$USER-<port>; keep it short:
# Ray's unix socket paths live under it and must stay below ~100 characters).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${COVRL_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
BIN="$(dirname "$PY")"
RAY="$BIN/ray"
[[ -x "$RAY" ]] || RAY="$(command -v ray)"

die() { echo "local-cluster: $*" >&2; exit 1; }

cmd="${1:-}"
if [[ "$cmd" == -h || "$cmd" == --help ]]; then sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0; fi
[[ -n "$cmd" ]] || die "usage: $0 start|stop|status|env|pids [options] (see the header of this file)"
shift

WORKERS=""
RES=()
HEAD_CPUS=2
WORKER_CPUS=1
WORKER_GPUS=0
PORT=6390
DASH_PORT=8275
PORT_BASE=27800
OBJ_MB=512
AUTH=token
TIMEOUT=120
STATE=""
JSON=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --worker-resources) RES+=("$2"); shift 2 ;;
    --head-cpus) HEAD_CPUS="$2"; shift 2 ;;
    --worker-cpus) WORKER_CPUS="$2"; shift 2 ;;
    --worker-gpus) WORKER_GPUS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dashboard-port) DASH_PORT="$2"; shift 2 ;;
    --port-base) PORT_BASE="$2"; shift 2 ;;
    --object-store-mb) OBJ_MB="$2"; shift 2 ;;
    --no-auth) AUTH=disabled; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --state-dir) STATE="$2"; shift 2 ;;
    --json) JSON=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
done
STATE="${STATE:-${COVRL_CLUSTER_DIR:-/tmp/covrl-cluster-${USER:-$(id -un)}-$PORT}}"

# Every live process in the process groups we started, plus all their descendants (Ray starts job drivers
# in new sessions, so process groups alone are not enough). Printed one pid per line.
tree_pids() {
  [[ -f "$STATE/pgids" ]] || return 0
  ps -e -o pid=,ppid=,pgid=,stat= | awk -v roots="$(tr '\n' ' ' < "$STATE/pgids")" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) if (r[i] != "") grp[r[i]] = 1 }
    $4 ~ /^Z/ { next }  # zombies are gone already (waiting for a parent to reap them)
    { pid[NR] = $1; ppid[$1] = $2; if ($3 in grp) keep[$1] = 1 }
    END {
      changed = 1
      while (changed) { changed = 0; for (i = 1; i <= NR; i++) { p = pid[i]; if (!(p in keep) && (ppid[p] in keep)) { keep[p] = 1; changed = 1 } } }
      for (p in keep) print p
    }'
}

write_env() {
  {
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT"
    echo "export COVRL_RAY_GCS=127.0.0.1:$PORT"
    echo "export RAY_AUTH_MODE=$AUTH"
    if [[ "$AUTH" == token ]]; then echo "export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"; fi
  } > "$STATE/env"
}

load_env() {
  [[ -f "$STATE/env" ]] || die "no cluster state in $STATE (start one first, or pass --state-dir)"
  # shellcheck disable=SC1091
  source "$STATE/env"
}

# Connects to the cluster and prints its nodes (json list, or a table).
show_nodes() {
  load_env
  timeout 90 "$PY" - "$COVRL_RAY_GCS" "$1" <<'EOF'
import json, sys, warnings
warnings.filterwarnings("ignore")
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
nodes = [
    {"node_id": n["NodeID"], "alive": n["Alive"], "head": "node:__internal_head__" in n["Resources"],
     "address": f'{n["NodeManagerAddress"]}:{n["NodeManagerPort"]}',
     "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
    for n in ray.nodes()
]
ray.shutdown()
if sys.argv[2] == "json":
    print(json.dumps(nodes, indent=1))
else:
    for n in nodes:
        kind = "head  " if n["head"] else "worker"
        state = "ALIVE" if n["alive"] else "DEAD "
        res = ", ".join(f"{k}={v:g}" for k, v in sorted(n["resources"].items()) if k not in ("memory", "object_store_memory"))
        print(f'{kind} {state} {n["node_id"]}  {n["address"]}  {res}')
EOF
}

start_node() {  # start_node INDEX LOGNAME ARGS...
  local i="$1" name="$2"
  shift 2
  local b=$((PORT_BASE + 10 * i))
  # setsid: the `ray start --block` process leads its own process group (pid == pgid), so stop can kill
  # the whole group; --block keeps gcs/raylet/dashboard/agents as its children instead of daemons.
  setsid env PATH="$BIN:$PATH" RAY_AUTH_MODE="$AUTH" ${AUTH_PATH_ENV:+"$AUTH_PATH_ENV"} \
    RAY_USAGE_STATS_ENABLED=0 \
    "$RAY" start --block --node-ip-address 127.0.0.1 --temp-dir "$STATE/n$i" \
    --node-manager-port "$b" --object-manager-port "$((b + 1))" \
    --dashboard-agent-listen-port "$((b + 2))" --dashboard-agent-grpc-port "$((b + 3))" \
    --runtime-env-agent-port "$((b + 4))" --metrics-export-port "$((b + 5))" \
    --object-store-memory "$((OBJ_MB * 1024 * 1024))" --disable-usage-stats "$@" \
    > "$STATE/logs/$name.log" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid" >> "$STATE/pgids"
  echo "$name $pid" >> "$STATE/nodes"
}

# Waits until node NAME's `ray start --block` says the runtime started (or fails if it exited / timed out).
wait_started() {
  local name="$1" pid deadline=$((SECONDS + TIMEOUT))
  pid=$(awk -v n="$name" '$1 == n {print $2}' "$STATE/nodes")
  until grep -q "Ray runtime started" "$STATE/logs/$name.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "local-cluster: node $name exited during start-up:" >&2
      grep -v '^ ' "$STATE/logs/$name.log" | tail -5 >&2
      return 1
    fi
    (( SECONDS < deadline )) || { echo "local-cluster: node $name not up after ${TIMEOUT}s" >&2; return 1; }
    sleep 0.5
  done
}

# Which of the given pids are still running (zombies count as gone).
running() {
  local p st
  for p in "$@"; do
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || true)
    [[ -n "$st" && "$st" != Z && "$st" != X ]] && echo "$p"
  done
  return 0
}

case "$cmd" in
  start)
    if [[ -f "$STATE/pgids" ]] && [[ -n "$(tree_pids)" ]]; then
      die "a cluster started from $STATE is still running (stop it first)"
    fi
    if [[ -z "$WORKERS" ]]; then WORKERS=$(( ${#RES[@]} > 0 ? ${#RES[@]} : 2 )); fi
    if [[ ${#RES[@]} -gt 0 && ${#RES[@]} -ne "$WORKERS" ]]; then
      die "--workers $WORKERS but ${#RES[@]} --worker-resources given (give one per worker, or none)"
    fi
    if [[ ${#RES[@]} -eq 0 ]]; then
      defaults=('{"gen_node": 1}' '{"learn_node": 1}' '{"verify_node": 1}')
      for ((i = 0; i < WORKERS; i++)); do RES+=("${defaults[$((i % 3))]}"); done
    fi
    for r in "${RES[@]}"; do
      "$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); assert isinstance(d, dict) and all(isinstance(v,(int,float)) for v in d.values())' "$r" \
        2>/dev/null || die "--worker-resources $r: expected a JSON object of name -> amount"
    done
    rm -rf "$STATE"
    mkdir -p "$STATE/logs"
    chmod 700 "$STATE"
    sock="$STATE/n$WORKERS/session_2000-01-01_00-00-00_000000_000000/sockets/plasma_store"
    (( ${#sock} < 100 )) || die "--state-dir $STATE is too long for Ray's unix sockets; use a shorter path"
    AUTH_PATH_ENV=""
    if [[ "$AUTH" == token ]]; then
      # A fresh token for this cluster only (not ~/.ray/auth_token, which other clusters may share).
      (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$STATE/auth_token")
      AUTH_PATH_ENV="RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
    fi
    write_env
    cat > "$STATE/config" <<EOF
port=$PORT
dashboard_port=$DASH_PORT
port_base=$PORT_BASE
workers=$WORKERS
auth=$AUTH
EOF
    : > "$STATE/pgids"
    : > "$STATE/nodes"
    trap 'echo "local-cluster: start failed; stopping what was started" >&2; "$0" stop --state-dir "$STATE" >&2 || true' ERR
    start_node 0 head --head --port "$PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
      --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --include-dashboard true \
      --ray-client-server-port "$((PORT_BASE + 9))"
    wait_started head
    # One worker at a time: `ray start` gives a raylet only 30 s to register, which a loaded 2-core
    # machine can miss when several register at once.
    for ((i = 0; i < WORKERS; i++)); do
      start_node "$((i + 1))" "worker$i" --address "127.0.0.1:$PORT" \
        --num-cpus "$WORKER_CPUS" --num-gpus "$WORKER_GPUS" --resources "${RES[$i]}"
      echo "worker$i ${RES[$i]}" >> "$STATE/worker_resources"
      wait_started "worker$i"
    done
    # Record the node list (ids, resources) once every node is alive.
    want=$((WORKERS + 1))
    for ((t = 0; t < 10; t++)); do
      alive=0
      if show_nodes json > "$STATE/nodes.json.tmp" 2>"$STATE/logs/show_nodes.err"; then
        alive=$("$PY" -c 'import json,sys; print(sum(n["alive"] for n in json.load(open(sys.argv[1]))))' "$STATE/nodes.json.tmp")
        if [[ "$alive" -ge "$want" ]]; then mv "$STATE/nodes.json.tmp" "$STATE/nodes.json"; break; fi
      fi
      sleep 2
    done
    [[ "$alive" -ge "$want" ]] || { echo "local-cluster: only $alive/$want nodes alive" >&2; cat "$STATE/logs/show_nodes.err" >&2; false; }
    trap - ERR
    echo "local-cluster: head + $WORKERS workers up (state: $STATE)"
    show_nodes table
    echo "dashboard/job API: http://127.0.0.1:$DASH_PORT   GCS: 127.0.0.1:$PORT   auth: $AUTH"
    echo "before submitting:  eval \"\$($0 env --state-dir $STATE)\""
    ;;
  stop)
    [[ -d "$STATE" ]] || { echo "local-cluster: nothing to stop ($STATE does not exist)"; exit 0; }
    pids=$(tree_pids)
    if [[ -z "$pids" ]]; then echo "local-cluster: nothing running from $STATE"; exit 0; fi
    # Workers first, then the head; SIGTERM lets `ray start --block` stop its children in order.
    for pg in $(tac "$STATE/pgids"); do kill -TERM -- "-$pg" 2>/dev/null || true; done
    for ((t = 0; t < 60; t++)); do
      [[ -z "$(running $pids)" ]] && break
      sleep 0.25
    done
    # Whatever is left (also descendants that left the groups, e.g. job drivers) gets SIGKILL, by pid.
    left=$( (echo "$pids"; tree_pids) | sort -u)
    for p in $(running $left); do kill -KILL "$p" 2>/dev/null || true; done
    for ((t = 0; t < 40; t++)); do
      still=$(running $left)
      [[ -z "$still" ]] && break
      sleep 0.25
    done
    [[ -z "$still" ]] || die "processes still alive after SIGKILL: $(echo $still)"
    echo "local-cluster: stopped $(echo "$left" | wc -w) processes started from $STATE"
    ;;
  status)
    [[ -f "$STATE/pgids" ]] || die "no cluster state in $STATE"
    n=$(tree_pids | wc -l)
    if [[ "$n" -eq 0 ]]; then echo "local-cluster: not running (state: $STATE)"; exit 3; fi
    echo "local-cluster: $n processes running (state: $STATE)"
    if [[ $JSON -eq 1 ]]; then show_nodes json; else show_nodes table; fi
    ;;
  env)
    [[ -f "$STATE/env" ]] || die "no cluster state in $STATE"
    cat "$STATE/env"
    ;;
  pids)
    tree_pids | sort -n
    ;;
  *) die "unknown command $cmd (start|stop|status|env|pids)" ;;
esac
