"""Checking a method's options against its defaults: unknown keys and wrong types are user errors."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ciss.errors import CissError


def resolve_options(method: str, defaults: Mapping[str, Any], given: Mapping[str, Any],
                    choices: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """`defaults` overridden by `given`, each value checked against its default's type and `choices`."""
    choices = choices or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise CissError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"for method '{method}'; valid options: {', '.join(sorted(defaults)) or '(none)'}")
    out = dict(defaults)
    for key, value in given.items():
        out[key] = _coerce(method, key, value, defaults[key])
        if key in choices and out[key] not in choices[key]:
            raise CissError(f"option '{key}' of method '{method}' must be one of "
                            f"{', '.join(map(repr, choices[key]))}; got {value!r}")
    return out


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    def bad(kind: str) -> CissError:
        return CissError(f"option '{key}' of method '{method}' must be {kind}; got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if value != value or value in (float("inf"), float("-inf")):
            raise bad("a finite number")
        if isinstance(default, int):
            if float(value) != int(value):
                raise bad("an integer")
            return int(value)
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)) or not value \
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            raise bad("a non-empty list of positive integers")
        return [int(v) for v in value]
    return value
