"""Method registry: names -> classes (a new method is its module plus one entry in METHODS), and building one from its preset plus user options.

Presets live in configs/methods.toml, one table per method with every option. Options resolve as
class defaults <- preset <- the options given to `build_method`; an unknown key is a CissError
naming it and the method's valid keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ciss.config_paths import config_dir, load_toml
from ciss.errors import CissError
from ciss.trainer.methods.base import Method
from ciss.trainer.methods.ft import FineTuning, Joint
from ciss.trainer.methods.gsc import GSC
from ciss.trainer.methods.idec import IDEC
from ciss.trainer.methods.mib import MiB
from ciss.trainer.methods.options import resolve_options
from ciss.trainer.methods.plop import PLOP
from ciss.trainer.registry import Registry

METHODS: Registry[type[Method]] = Registry("method", {"ft": FineTuning, "gsc": GSC, "idec": IDEC, "joint": Joint,
                                                       "mib": MiB, "plop": PLOP})
PRESETS = config_dir() / "methods.toml"

__all__ = ["METHODS", "PRESETS", "Method", "build_method", "load_presets", "method_options"]


def _lookup(name: str) -> type[Method]:
    return METHODS[str(name).strip().lower()]


def load_presets(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The tables of configs/methods.toml ({} when the file is absent, e.g. outside a checkout)."""
    path = PRESETS if path is None else Path(path)
    if not path.exists():
        return {}
    data = load_toml(path, "method presets file")
    return {k: dict(v) for k, v in data.items() if isinstance(v, dict)}


def method_options(name: str, options: Mapping[str, Any] | None = None,
                   presets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Every option of method `name`: class defaults <- preset <- `options`, checked."""
    cls = _lookup(name)
    defaults: dict[str, Any] = getattr(cls, "defaults", {})
    choices = getattr(cls, "choices", {})
    presets = load_presets() if presets is None else presets
    preset = dict(presets.get(cls.name, {}))
    bad = sorted(set(preset) - set(defaults))
    if bad:
        raise CissError(f"{PRESETS} [{cls.name}] has unknown option(s) {', '.join(bad)}; "
                        f"valid options: {', '.join(sorted(defaults))}")
    resolved = resolve_options(cls.name, defaults, preset, choices)
    return resolve_options(cls.name, resolved, dict(options or {}), choices)


def build_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """A ready method: `name` in METHODS, `options` over its preset (unknown keys -> CissError)."""
    cls = _lookup(name)
    return cls(**method_options(name, options))
