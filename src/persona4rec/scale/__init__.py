"""Scale-out on Ray: a sharded index served by Ray Serve, and the offline pipeline on Ray Data.

Nothing on the single-machine path imports this package, and this package imports Ray only
inside the modules that need it (:mod:`.serve`, :mod:`.pipeline`), so ``import
persona4rec.scale.client`` works without Ray. Install with ``pip install persona4rec[scale]``.
"""

from __future__ import annotations


def require_ray():
    """Import Ray or say how to install it."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the scale-out commands need Ray: pip install 'persona4rec[scale]'") from e
    return ray
