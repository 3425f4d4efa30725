#!/usr/bin/env bash
# Static checks, configured in pyproject.toml ([tool.ruff], [tool.mypy]); zero findings. Run by
# scripts/test.sh; on its own (after bootstrap, which installs the pinned ruff and mypy of the
# [test] extra): bash scripts/static.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Initial scope of the formatter: these paths are ruff-formatted; the rest of the tree is not yet
# (85 files would be reformatted when this was added) and joins the list as each is reformatted.
FORMATTED=(scripts tests/conftest.py tests/test_layers.py tests/test_llm_server.py)
python -m ruff check --no-fix .
python -m ruff format --check "${FORMATTED[@]}"
python -m mypy
# The C++ core: .clang-format at the repository root.
git ls-files -z 'cpp/*.cpp' 'cpp/*.hpp' | xargs -0 clang-format --dry-run --Werror
