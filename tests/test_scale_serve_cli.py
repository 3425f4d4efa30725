"""`persona4rec serve --index DIR` with no address: an embedded local Ray, answers equal to one
PersonaIndex, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("httpx")

from scale_helpers import LOOPBACK_ENV, loopback_ray  # noqa: E402
from scale_helpers import catalog as _catalog  # noqa: E402
from scale_helpers import free_port as _free_port  # noqa: E402
from scale_helpers import users as _users  # noqa: E402

from persona4rec import PersonaIndex, ShardedPersonaIndex  # noqa: E402
from persona4rec.scale.client import IndexClient  # noqa: E402

ray = loopback_ray()

pytestmark = pytest.mark.slow


def test_serve_command_with_embedded_ray(tmp_path):
    """`persona4rec serve --index DIR` with no address starts (and on SIGTERM stops) its own Ray."""
    if ray.is_initialized():
        pytest.skip("a Ray connection is open in this process")
    ids, vecs, offsets, personas = _catalog(60, seed=3)
    ShardedPersonaIndex.build(ids, vecs, offsets, personas, n_shards=2, path=tmp_path / "idx")
    single = PersonaIndex.build(ids, vecs, offsets, personas)
    port = _free_port()
    env = {**os.environ, **LOOPBACK_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "persona4rec.cli", "serve", "--index", str(tmp_path / "idx"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith("serving "), "".join(lines[-20:])
        with IndexClient(f"http://127.0.0.1:{port}", timeout=60) as client:
            q = _users(2, seed=9)
            a, b = single.search(q, 5), client.search(q, 5)
            assert a[0].tolist() == b[0].tolist()
            np.testing.assert_array_equal(a[1], b[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stdout.close()
