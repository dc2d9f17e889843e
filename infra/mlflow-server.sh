#!/usr/bin/env bash
# Start an MLflow tracking server for ovss-tune searches.
#   infra/mlflow-server.sh                      # sqlite store + local artifacts, 127.0.0.1:5000
#   MLFLOW_BACKEND=postgresql://user:pw@db/mlflow MLFLOW_ARTIFACTS=s3://bucket/ovss \
#   MLFLOW_HOST=0.0.0.0 infra/mlflow-server.sh  # shared server (put auth in front of it)
# Searches then log there with --tracking-uri http://<host>:5000.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${MLFLOW_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
BACKEND=${MLFLOW_BACKEND:-sqlite:///$PWD/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS:-$PWD/mlartifacts}
exec .venv/bin/mlflow server --host "$HOST" --port "$PORT" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
