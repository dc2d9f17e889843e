#!/usr/bin/env bash
# Start an MLflow tracking server for ovss-tune searches.
#   infra/mlflow-server.sh                      # sqlite store + local artifacts, 127.0.0.1:5000
#   MLFLOW_BACKEND=postgresql://user:pw@db/mlflow MLFLOW_ARTIFACTS=s3://bucket/ovss \
#   MLFLOW_HOST=0.0.0.0 MLFLOW_AUTH=1 infra/mlflow-server.sh   # shared server, with logins
# It binds 127.0.0.1 unless MLFLOW_HOST says otherwise. MLFLOW_AUTH=1 turns on MLflow's basic
# authentication (--app-name basic-auth): the first start creates the user `admin` with the
# password in MLFLOW_AUTH_ADMIN_PASSWORD (MLFLOW_AUTH_CONFIG_PATH may name your own ini); clients
# then set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD. Searches log there with
# --tracking-uri http://<host>:5000.
# Without MLFLOW_AUTH it runs the app `ovss` (search/mlflow_app.py, installed with this repo):
# MLflow's server whose UI opens experiments on their runs table instead of the GenAI overview
# (MLflow 3.17's default); with basic-auth, the links a search prints name the view instead.
#
# Allowed hosts: MLflow answers 403 "Invalid Host header" to a request whose Host header it does
# not know (its guard against DNS rebinding; by default it knows only localhost and private IPs).
# MLFLOW_ALLOWED_HOSTS (comma list; a name without a port is allowed on any port, `*` wildcards
# as in MLflow's --allowed-hosts) names the hosts clients use, e.g. MLFLOW_ALLOWED_HOSTS=mlflow
# for --tracking-uri http://mlflow:5000. On a non-loopback MLFLOW_HOST it defaults to "mlflow"
# and this machine's host names. localhost and private IPs stay allowed either way.
#
# MLflow's job runner (huey consumers for its GenAI jobs) stays off: ovss-tune uses none of it,
# and it costs ~20 CPU-s and 8 processes at each start (bench/mlflow_server.py). Set
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it.
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
BACKEND=${MLFLOW_BACKEND:-sqlite:///$PWD/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS:-$PWD/mlartifacts}
MLFLOW=${MLFLOW_BIN:-.venv/bin/mlflow}
case "$HOST" in
  127.*|localhost|::1) ALLOWED=${MLFLOW_ALLOWED_HOSTS:-} ;;
  *) ALLOWED=${MLFLOW_ALLOWED_HOSTS:-mlflow,$(hostname -s 2>/dev/null || hostname),$(hostname -f 2>/dev/null || hostname)} ;;
esac
EXTRA=()
if [ -n "$ALLOWED" ]; then
  hosts=""
  IFS=, read -ra names <<< "$ALLOWED"
  for h in "${names[@]}"; do
    h=${h// /}
    [ -n "$h" ] || continue
    case "$h" in *:*|*\**) hosts+="$h," ;; *) hosts+="$h,$h:*," ;; esac
  done
  # MLflow's own defaults, which an explicit list replaces: loopback and private IPs.
  hosts+="localhost,localhost:*,127.0.0.1,127.0.0.1:*,[::1],[[]::1]:*,10.*,192.168.*"
  for i in $(seq 16 31); do hosts+=",172.$i.*"; done
  EXTRA=(--allowed-hosts "$hosts")
  echo "mlflow-server: allowed hosts: $ALLOWED (+ loopback, private IPs)" >&2
fi
AUTH=(--app-name ovss)
if [ "${MLFLOW_AUTH:-0}" = "1" ]; then AUTH=(--app-name basic-auth); fi
exec "$MLFLOW" server --host "$HOST" --port "$PORT" ${AUTH[@]+"${AUTH[@]}"} \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts \
  ${EXTRA[@]+"${EXTRA[@]}"}
