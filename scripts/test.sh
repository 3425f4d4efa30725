#!/usr/bin/env bash
# The test command: sets up the environment (scripts/bootstrap.sh) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# shellcheck disable=SC1091
. "${PERSONA4REC_VENV:-.venv}/bin/activate"
if [ -z "${PERSONA4REC_SHARED:-}" ] && [ -d ../shared ]; then
  PERSONA4REC_SHARED="$(cd ../shared && pwd)"
  export PERSONA4REC_SHARED
fi
# Lint, format and type checks first: seconds, and their findings name the line to fix.
bash scripts/static.sh
python -m pytest -p no:cacheprovider --rootdir=. -c pyproject.toml tests "$@"
# CI also runs the native core's tests once under AddressSanitizer + UBSan, and builds, repairs
# and tests the manylinux wheel (and the sdist it is built from) on a PATH with no compiler.
if [ "${CI:-}" = "true" ]; then
  bash scripts/sanitize.sh
  bash scripts/wheel.sh
fi
