#!/usr/bin/env bash
# The main job: set up the environment (first run: a few minutes) and evaluate persona
# scoring against collaborative-filtering and dense baselines on Amazon MI-5core.
# Extra arguments go to `persona4rec evaluate`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The one-time ONNX export of the default encoder needs the pinned CPU torch.
PERSONA4REC_FULL=1 bash scripts/bootstrap.sh
# shellcheck disable=SC1091
. "${PERSONA4REC_VENV:-.venv}/bin/activate"
if [ -z "${PERSONA4REC_SHARED:-}" ] && [ -d ../shared ]; then
  PERSONA4REC_SHARED="$(cd ../shared && pwd)"
  export PERSONA4REC_SHARED
fi
exec persona4rec evaluate --dataset amazon-mi-5core "$@"
