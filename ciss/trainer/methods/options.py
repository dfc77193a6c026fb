"""Checking a method's options against its defaults: unknown keys and wrong types are user errors."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ciss.errors import CissError
from ciss.config import toml_text
from ciss.config_rules import Rule, rule_for


def resolve_options(method: str, defaults: Mapping[str, Any], given: Mapping[str, Any],
                    choices: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """`defaults` overridden by `given`, each value checked against its default's type and `choices`."""
    choices = choices or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise CissError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"for method '{method}'; valid options: {', '.join(sorted(defaults)) or '(none)'}")
    out = dict(defaults)
    for key, value in given.items():
        rule = _rule(defaults[key], tuple(choices.get(key, ())))
        problem = rule.problem(value)
        if problem:
            raise CissError(f"--opt {method}.{key}={toml_text(value)}: option '{key}' of method '{method}' "
                            f"{problem}; e.g. --opt {method}.{key}={toml_text(defaults[key])}")
        out[key] = rule.clean(value)
    return out


def _rule(default: Any, choices: tuple[str, ...]) -> Rule:
    """The config rule for an option of `default`'s type: strict TOML types, finite numbers."""
    return PositiveInts() if isinstance(default, (list, tuple)) else rule_for(default, choices)


class PositiveInts:
    """A non-empty list of positive integers (PLOP's pyramid scales)."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or not value \
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            return "must be a non-empty list of positive integers"
        return None

    def clean(self, value: Any) -> Any:
        return [int(v) for v in value]
