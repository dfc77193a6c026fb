"""The names the command line offers (methods, model presets, dataset kinds, backends, ...), read from
their registries and name tables when a value is checked or the help is shown, not when `ciss` starts.

The trainer's registries and configs/models.toml are read only then, so `ciss --help` and `ciss live`
import no torch (and work on the runtime-only install, which has no configs/); a refusal is the
registry's own one line, the same as the library's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click


class Name(click.ParamType):
    """One of the names `names()` returns; `check(value)` refuses any other in its registry's words.

    The metavar lists the names ([a|b|c]) unless `metavar` is given (a long list goes in the help)."""

    name = "name"

    def __init__(self, names: Callable[[], Sequence[str]], check: Callable[[str], object],
                 metavar: str | None = None):
        self.names, self.check, self.metavar = names, check, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.metavar or f"[{'|'.join(self.names())}]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        self.check(value)
        return value


class ListedHelp(click.Option):
    """An option whose `help` is a function, called when the help is shown: it lists a registry's names."""

    def __init__(self, *decls: Any, help: Callable[[], str], **attrs: Any):
        super().__init__(*decls, **attrs)
        self.listed_help = help

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self.listed_help()
        return super().get_help_record(ctx)


def listing(names: Sequence[str]) -> str:
    """"a, b or c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def methods() -> Sequence[str]:
    from ciss.trainer.methods import METHODS

    return tuple(METHODS)


def check_method(name: str) -> str:
    from ciss.trainer.methods import check_name

    return check_name(name)


def method_help() -> str:
    from ciss.trainer.config import DEFAULT_METHOD

    return f"{listing(methods())} (default: the run's, else {DEFAULT_METHOD})."


def dataset_kinds() -> Sequence[str]:
    from ciss.trainer.data import READERS

    return tuple(READERS)


def check_dataset_kind(name: str) -> str:
    from ciss.trainer.data import READERS

    return READERS.check(name)


def dataset_help() -> str:
    return f"Dataset by kind, with --root: {listing(dataset_kinds())} (folder: the format --data reads)."


def model_presets() -> Sequence[str]:
    from ciss.trainer.schema import model_presets

    return model_presets()


def model_help() -> str:
    from ciss.trainer.config import REAL_DATA_PRESET, SYNTHETIC_PRESET

    notes = {REAL_DATA_PRESET: " (default for real data)", SYNTHETIC_PRESET: " (default for the synthetic scenes)"}
    return f"Model preset (configs/models.toml): {', '.join(n + notes.get(n, '') for n in model_presets() if n != 'auto')}."


def setting_choices(key: str) -> Sequence[str]:
    """The choices of the `ciss learn` setting `key` (configs/defaults.toml's rules)."""
    from ciss.trainer.schema import SCHEMA

    return SCHEMA[key].choices  # type: ignore[attr-defined]


def check_setting(key: str, flag: str) -> Callable[[str], object]:
    """A check of a flag's value against the rule of the `ciss learn` setting `key`, naming the flag."""
    def check(value: str) -> object:
        from ciss.trainer.config import TRAINING

        return TRAINING.check_setting(key, value, flag)
    return check
