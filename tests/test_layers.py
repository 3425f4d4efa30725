"""The import layers hold: every persona4rec module imports only from floors below its own.

The floors follow /work/shared/ARCHITECTURE.md ("A layering that removes the circles"); the table below
is the explicit source of truth. A module may import modules on lower floors and modules of its own
package (a room of several files, e.g. ``llm``); nothing sideways into another room on its floor and
nothing upwards. Two checks:

* loaded: each module is imported in a fresh interpreter (the package's ``__init__`` is not run, so its
  re-exports do not hide anything) and the persona4rec modules it loaded are read from ``sys.modules``;
* written: every ``import`` statement in the source, including those inside functions, which a run-time
  check never sees but which still tie the modules together.

Arrows that run back up today are listed in ``KNOWN_BACKWARD_ARROWS`` with why they exist; each has a
strict xfail test, so fixing one fails the suite until its entry is removed, and any new arrow that runs
back up (a new circle) fails at once.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

# Floor of each room, bottom to top. A room is a module or a subpackage (all its modules).
FLOORS: dict[str, int] = {
    # 1: the ground floor: the native core and, once they exist, errors, paths and hashing
    "persona4rec._core": 1,
    "persona4rec.errors": 1,
    "persona4rec.paths": 1,
    "persona4rec.hashing": 1,
    # 2: the kernel seam, persistence, the ONNX encoder, the data layer
    "persona4rec.kernels": 2,
    "persona4rec._persist": 2,
    "persona4rec.encoder": 2,
    "persona4rec.data": 2,
    # 3: approximate search, the (torch) export
    "persona4rec._ann": 3,
    "persona4rec.export": 3,
    # 4: the default encoder, exported on first use (above the encoder and the exporter)
    "persona4rec.default_model": 4,
    # 4: the index, user profiles, extractive personas
    "persona4rec.index": 4,
    "persona4rec.profile": 4,
    "persona4rec.personas": 4,
    "persona4rec.selection": 4,
    # 5: what is built on the index and the profiles; the offline LLM stages; training
    "persona4rec.sharded": 5,
    "persona4rec.recommender": 5,
    "persona4rec.llm": 5,
    "persona4rec.train": 5,
    # 6: evaluation and the scale-out code
    "persona4rec.evaluation": 6,
    "persona4rec.scale": 6,
    # 7: the public API (the package's re-exports in persona4rec/__init__.py)
    "persona4rec": 7,
    # 8: command lines and the demo (public API only)
    "persona4rec.cli": 8,
    "persona4rec.demo": 8,
    "persona4rec.data.command": 8,
    "persona4rec.evaluation.command": 8,
    "persona4rec.llm.cli": 8,
    "persona4rec.train.cli": 8,
    "persona4rec.scale.cli": 8,
}

# (importer, imported room) -> why the arrow exists today. Each must go; each has a strict xfail below.
KNOWN_BACKWARD_ARROWS: dict[tuple[str, str], str] = {}


def package_dirs() -> list[Path]:
    """The package's folders: one for an install, two for an editable one (sources and the built core)."""
    spec = importlib.util.find_spec("persona4rec")
    assert spec is not None and spec.submodule_search_locations, "persona4rec is not installed"
    return [Path(p) for p in spec.submodule_search_locations]


@cache
def all_modules() -> tuple[str, ...]:
    """Every persona4rec module, found on disk without importing any."""
    names = {m.name for m in pkgutil.walk_packages([str(p) for p in package_dirs()], "persona4rec.")}
    return tuple(sorted(names | {"persona4rec"}))


def room_of(module: str) -> str:
    """The longest table entry that is the module or a package above it (the bare package name stands
    for its ``__init__`` only, so a module missing from the table is not silently given floor 7)."""
    if module == "persona4rec":
        return module
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in FLOORS:
            return ".".join(parts[:n])
    raise KeyError(f"{module} has no floor: add it to FLOORS in tests/test_layers.py (see ARCHITECTURE.md)")


def room_package(room: str) -> str:
    """The subpackage a room belongs to: command-line modules sit higher but live in their package."""
    parts = room.split(".")
    return ".".join(parts[:2])


def backward(importer: str, imported: str) -> bool:
    """True when the arrow importer -> imported does not run strictly down the floors."""
    a, b = room_of(importer), room_of(imported)
    if a == b:
        return False
    if b == "persona4rec":  # the re-exports: only what sits above the public API may use them
        return FLOORS[a] <= FLOORS[b]
    same_package = room_package(a) == room_package(b) and a != "persona4rec" and b != "persona4rec"
    if same_package and FLOORS[b] <= FLOORS[a]:
        return False  # e.g. llm.cli -> llm, or the modules of llm among themselves
    return FLOORS[b] >= FLOORS[a]


def known(importer: str, imported: str) -> bool:
    return any(importer == i and room_of(imported) == r for i, r in KNOWN_BACKWARD_ARROWS)


PROBE = """
import importlib, importlib.util, json, sys
spec = importlib.util.find_spec("persona4rec")
sys.modules["persona4rec"] = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
name = sys.argv[1]
error = None
try:
    importlib.import_module(name)
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"loaded": sorted(k for k in sys.modules if k.startswith("persona4rec.")), "error": error}))
"""


@cache
def loaded_by_all() -> dict[str, list[str]]:
    """What importing each module loads, each in an interpreter of its own (two at a time)."""

    def probe(name: str) -> tuple[str, list[str]]:
        if name == "persona4rec":
            code = "import json, sys, persona4rec; print(json.dumps({'loaded': sorted(sys.modules), 'error': None}))"
            args = [sys.executable, "-c", code]
        else:
            args = [sys.executable, "-c", PROBE, name]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"importing {name} crashed the interpreter:\n{done.stderr[-3000:]}"
        result = json.loads(done.stdout.strip().splitlines()[-1])
        # An import that fails for a missing optional dependency still loaded what it reached first;
        # one that fails on persona4rec itself (e.g. a name taken from the un-run __init__) is an error.
        if result["error"] and "from 'persona4rec" in result["error"]:
            raise AssertionError(f"importing {name} on its own failed: {result['error']}")
        loaded = [m for m in result["loaded"] if m.startswith("persona4rec.") and m != name]
        return name, loaded

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(probe, all_modules()))


def written_imports(module: str) -> set[str]:
    """The persona4rec modules that a module's source imports anywhere, functions included."""
    relative = module.split(".")[1:]
    candidates = [root.joinpath(*relative, "__init__.py") for root in package_dirs()]
    if relative:
        candidates += [root.joinpath(*relative[:-1], relative[-1] + ".py") for root in package_dirs()]
    existing = [c for c in candidates if c.is_file()]
    if not existing:  # the compiled core: no Python source
        return set()
    path = existing[0]
    is_package = path.name == "__init__.py"
    modules = set(all_modules()) | {"persona4rec._core"}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("persona4rec")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("persona4rec"):
                # `from persona4rec.llm import stages` imports a module; `from persona4rec import X` a name
                found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names}
    found.discard(module)
    return found


def test_every_module_has_a_floor() -> None:
    missing = []
    for module in all_modules():
        try:
            room_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"add these modules to FLOORS in tests/test_layers.py (see ARCHITECTURE.md): {missing}"


@pytest.mark.slow  # one interpreter per module: ~50 imports, 10 s of CPU
@pytest.mark.parametrize("module", all_modules())
def test_importing_a_module_loads_only_lower_floors(module: str) -> None:
    loaded = loaded_by_all()[module]
    up = sorted(m for m in loaded if backward(module, m) and not known(module, m))
    assert not up, (
        f"{module} (floor {FLOORS[room_of(module)]}) loads modules that are not below it: "
        f"{[(m, FLOORS[room_of(m)]) for m in up]}"
    )


@pytest.mark.parametrize("module", all_modules())
def test_every_written_import_points_down(module: str) -> None:
    up = sorted(m for m in written_imports(module) if backward(module, m) and not known(module, m))
    assert not up, (
        f"{module} (floor {FLOORS[room_of(module)]}) imports modules that are not below it, "
        f"at module level or inside a function: {[(m, FLOORS[room_of(m)]) for m in up]}"
    )


@pytest.mark.parametrize(
    ("importer", "room"),
    [
        pytest.param(i, r, marks=pytest.mark.xfail(strict=True, reason=why), id=f"{i}->{r}")
        for (i, r), why in KNOWN_BACKWARD_ARROWS.items()
    ],
)
def test_known_backward_arrow_is_gone(importer: str, room: str) -> None:
    """Fails (as expected) while the arrow exists; passes, and so fails the strict xfail, once it is
    gone: then delete its entry from KNOWN_BACKWARD_ARROWS."""
    if importer not in all_modules():
        return
    assert not any(room_of(m) == room for m in written_imports(importer)), f"{importer} still imports {room}"


def test_the_rule_itself() -> None:
    """The check would catch what it is for: an arrow up, one sideways, and the facade used from below."""
    assert backward("persona4rec.kernels", "persona4rec.index")  # up
    assert backward("persona4rec.llm.stages", "persona4rec.train.pairs")  # sideways between rooms
    assert backward("persona4rec.index", "persona4rec")  # the re-exports from below
    assert not backward("persona4rec.index", "persona4rec.kernels")  # down
    assert not backward("persona4rec.llm.jobs", "persona4rec.llm.client")  # within a room
    assert not backward("persona4rec.llm.cli", "persona4rec.llm.stages")  # a command line into its package
    assert backward("persona4rec.llm.stages", "persona4rec.llm.cli")  # ... but not back out of it
    assert not backward("persona4rec.demo", "persona4rec")  # the demo uses the public API
