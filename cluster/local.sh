#!/usr/bin/env bash
# A local Ray head (+ optional worker nodes) and an MLflow server on 127.0.0.1, with the repository's
# virtual environment. Same as `cvlab cluster local ...`:
#   cluster/local.sh up [--workers N] [--ray-port P] [--dashboard-port P] [--mlflow-port P] [--state-dir DIR]
#   cluster/local.sh status [--state-dir DIR]
#   cluster/local.sh down [--state-dir DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${CVLAB_PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
  echo "local.sh: $python not found; run 'make install' first or set CVLAB_PYTHON" >&2
  exit 2
fi
if [[ $# -lt 1 || ! "$1" =~ ^(up|down|status)$ ]]; then
  echo "usage: cluster/local.sh up|down|status [options]   (see: cluster/local.sh up --help)" >&2
  exit 2
fi
cd "$root"
exec "$python" -m orchestrator cluster local "$@"
