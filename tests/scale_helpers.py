"""Helpers of the Ray tests (tests/test_scale_*.py): loopback-only Ray, small catalogs, free ports."""

from __future__ import annotations

import os
import socket

import numpy as np

# Ray advertises the machine's own address unless it believes it runs on a laptop without a
# cluster; this switch (read by Ray at import, and by the processes it starts) keeps every Ray
# socket of the tests on 127.0.0.1.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def loopback_ray():
    """Import Ray configured for 127.0.0.1 only (also for the processes it starts)."""
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before the variable was set
    return ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def catalog(n_items: int = 400, seed: int = 0, dim: int = 16):
    """Items with 1-4 personas on a coarse grid of values (many exact score ties)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n_items)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    vecs = rng.integers(-2, 3, size=(int(offsets[-1]), dim)).astype(np.float32)
    vecs[~vecs.any(axis=1), 0] = 1
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"item-{i}" for i in range(n_items)]
    personas = [{"persona_id": f"{ids[i]}/p{r - offsets[i]}", "name": f"name {r}"}
                for i in range(n_items) for r in range(offsets[i], offsets[i + 1])]
    return ids, vecs, offsets, personas


def users(n: int, seed: int = 1, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, size=(n, dim)).astype(np.float32)
    q[~q.any(axis=1), 0] = 1
    return q / np.linalg.norm(q, axis=1, keepdims=True)
