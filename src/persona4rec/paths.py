"""Where persona4rec keeps files, and the environment variables that move them (ground floor)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "default_cache_dir"]

CACHE_ENV_VAR = "PERSONA4REC_CACHE_DIR"


def default_cache_dir() -> Path:
    """Per-user cache root: ``$PERSONA4REC_CACHE_DIR``, else ``$XDG_CACHE_HOME/persona4rec``,
    else ``~/.cache/persona4rec``. Never a shared temporary directory."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "persona4rec"
    return Path.home() / ".cache" / "persona4rec"
