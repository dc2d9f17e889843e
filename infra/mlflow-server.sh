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
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
BACKEND=${MLFLOW_BACKEND:-sqlite:///$PWD/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS:-$PWD/mlartifacts}
AUTH=()
if [ "${MLFLOW_AUTH:-0}" = "1" ]; then AUTH=(--app-name basic-auth); fi
exec .venv/bin/mlflow server --host "$HOST" --port "$PORT" ${AUTH[@]+"${AUTH[@]}"} \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
