"""A short run of the atheris target over PersonaIndex.load (tests/fuzz/), in CI.

The long campaign is run by hand (see the target's docstring); this keeps the target
working and catches a regression that mutations of the seed files reach quickly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="the fuzz smoke test needs atheris (the [test] extra on CPython x86_64)")

TARGET = Path(__file__).parent / "fuzz" / "fuzz_index_load.py"


@pytest.mark.slow
def test_index_load_fuzz_target_finds_nothing_in_a_short_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(TARGET), "-runs=4000", "-max_total_time=90", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=300,
    )
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, f"fuzzing found a problem:\n{tail}"
    assert "Done" in tail and not list(tmp_path.glob("crash-*"))
