"""Method registry: names -> classes (a new method is its module plus one entry in METHODS), and building one from its preset plus user options.

Presets live in configs/methods.toml, one table per method with every option. Options resolve as
class defaults <- preset <- the options given to `build_method`; an unknown key is a CissError
naming it and the method's valid keys. Each method's module (and torch) is imported when it is first
built, so the command line lists and checks the names without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ciss.config_paths import config_dir, load_toml
from ciss.errors import CissError
from ciss.trainer.methods.options import resolve_options
from ciss.trainer.registry import Registry

if TYPE_CHECKING:
    from ciss.trainer.methods.base import Method

METHODS: Registry[type[Method]] = Registry("method", {
    "ft": "ciss.trainer.methods.ft:FineTuning",
    "gsc": "ciss.trainer.methods.gsc:GSC",
    "idec": "ciss.trainer.methods.idec:IDEC",
    "joint": "ciss.trainer.methods.ft:Joint",
    "mib": "ciss.trainer.methods.mib:MiB",
    "plop": "ciss.trainer.methods.plop:PLOP",
})
PRESETS = config_dir() / "methods.toml"

__all__ = ["METHODS", "PRESETS", "build_method", "check_name", "load_presets", "method_options"]


def check_name(name: str) -> str:
    """The registered method that `name` names (case and surrounding spaces aside: MiB is mib), without
    importing it; an unknown name is refused in one line."""
    return METHODS.check(str(name).strip().lower())


def _lookup(name: str) -> type[Method]:
    return METHODS[check_name(name)]


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
