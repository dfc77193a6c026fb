"""Where ciss finds its shipped configs and keeps its caches, and how config files are read."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import ciss
from ciss.errors import CissError


def config_dir() -> Path:
    """The repository's configs/ folder (next to the ciss package, so it works from a checkout)."""
    return Path(ciss.__file__).resolve().parents[1] / "configs"


def cache_dir() -> Path:
    """Derived data that is safe to delete (presence matrices); CISS_CACHE overrides the location."""
    env = os.environ.get("CISS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ciss"


def load_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise CissError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CissError(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise CissError(f"{what} {path} is not valid TOML: {e}") from None
