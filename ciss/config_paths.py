"""Where ciss finds its shipped configs and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

import ciss


def config_dir() -> Path:
    """The repository's configs/ folder (next to the ciss package, so it works from a checkout)."""
    return Path(ciss.__file__).resolve().parents[1] / "configs"


def cache_dir() -> Path:
    """Derived data that is safe to delete (presence matrices); CISS_CACHE overrides the location."""
    env = os.environ.get("CISS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ciss"
