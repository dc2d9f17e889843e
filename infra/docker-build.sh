#!/usr/bin/env bash
# Build infra/Dockerfile's image (the one infra/kuberay.yaml runs) and check that ovss-tune
# imports in it - only where a docker engine answers; otherwise print why it is skipped.
# Run from anywhere; CI (.ci/run) runs it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=$(sed -n 's/^LABEL org\.opencontainers\.image\.ref\.name="\([^"]*\)"$/\1/p' infra/Dockerfile)
[ -n "$TAG" ] || { echo "docker-build: no image tag label in infra/Dockerfile" >&2; exit 1; }
if ! command -v docker >/dev/null 2>&1; then
  echo "docker-build: skipped: no docker client on this machine"
  exit 0
fi
if ! timeout 30 docker info >/dev/null 2>&1; then
  echo "docker-build: skipped: no docker engine answers (docker info failed)"
  exit 0
fi
echo "docker-build: building $TAG from infra/Dockerfile"
DOCKER_BUILDKIT=1 docker build -f infra/Dockerfile -t "$TAG" .
docker run --rm "$TAG" python -c "import search.run, methods, ray, mlflow, psycopg; \
print('image ok: ray', ray.__version__, 'mlflow', mlflow.__version__)"
echo "docker-build: built and checked $TAG"
