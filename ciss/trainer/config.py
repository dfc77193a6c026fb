"""One resolved config per step: defaults < config file < command-line flags.

Configs are plain nested dicts of TOML data. Unknown keys are refused instead of ignored, so a
typo in a config file cannot silently train something else.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ciss.config_paths import config_dir, load_toml
from ciss.errors import CissError


FREE_FORM = ("method", "data.options")


def defaults() -> dict[str, Any]:
    return load_toml(config_dir() / "defaults.toml")


def merge(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`; keys must already exist in `base`.

    `method` and `data.options` are free-form: the method and the dataset reader check them.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key not in out and not where.startswith(FREE_FORM):
            raise CissError(f"unknown config key '{path}'; valid keys here: {', '.join(sorted(out))}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(config_file: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = defaults()
    cfg.setdefault("method", {})
    if config_file is not None:
        cfg = merge(cfg, load_toml(Path(config_file)))
    return merge(cfg, overrides)


REAL_DATA_PRESET = "mobilenet_v2"  # ImageNet-pretrained edge model: what real data deserves by default
SYNTHETIC_PRESET = "tiny"


def resolve_model(cfg: dict[str, Any]) -> dict[str, Any]:
    """Replace `model.preset = "auto"` by the preset for the data: tiny for the synthetic scenes (tests,
    the CPU demo), the pretrained edge model for anything real. The manifest then names the real one."""
    out = copy.deepcopy(cfg)
    if out["model"]["preset"] == "auto":
        d = out["data"]
        synthetic = d["kind"] == "synthetic" or (not d["kind"] and not d["root"])
        out["model"]["preset"] = SYNTHETIC_PRESET if synthetic else REAL_DATA_PRESET
    return out
