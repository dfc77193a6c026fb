"""One way to resolve a command's settings: its defaults < a `--config FILE` < the command line.

`ciss learn` (configs/defaults.toml), `ciss export` and `ciss live` (the tables in
ciss/export/settings.py and ciss/runtime/settings.py), the demo and the benchmarks all resolve their
settings through a `Settings`, in the manner of Ultralytics' `get_cfg`: a config file and
`--set SECTION.KEY=VALUE` mean the same thing everywhere, an unknown key is refused with the closest
one suggested, and every value is checked against its key's rule (ciss/config_rules.py) before
anything runs. Configs are plain nested dicts of TOML data. Torch-free: `ciss live` resolves its
settings here on the runtime-only install.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciss.config_paths import load_toml
from ciss.config_rules import Rule, kind_of, rule_for
from ciss.errors import CissError


def toml_text(value: Any) -> str:
    """A value as it is typed after `=` in `--set KEY=VALUE` (TOML: 3, 0.5, true, "s", [1, 2], nan, {a = 1})."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(toml_text, value))}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{_toml_key(k)} = {toml_text(v)}' for k, v in value.items())}}}"
    return json.dumps(value)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def parse_assignment(item: str, flag: str, example: str) -> tuple[str, Any]:
    """`KEY=VALUE` from `flag`, the value read as TOML; a bare word stays a string (median, cuda)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise CissError(f"{flag} {item!r} is not KEY=VALUE; e.g. {flag} {example}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def parse_assignments(items: tuple[str, ...], flag: str, example: str) -> dict[str, Any]:
    """Repeated `flag KEY=VALUE` as {KEY: value}, values read as TOML (3, 0.5, true, "s")."""
    return dict(parse_assignment(item, flag, example) for item in items)


def _did_you_mean(key: str, section: Any, where: str) -> str:
    close = difflib.get_close_matches(key, list(section), n=1)
    return f" (did you mean '{where + '.' if where else ''}{close[0]}'?)" if close else ""


def merge(base: dict[str, Any], override: Mapping[str, Any], where: str = "",
          free_form: tuple[str, ...] = ()) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`; keys must already exist in `base`, except inside
    the `free_form` tables (whose keys their reader checks)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key not in out and not where.startswith(free_form):
            raise CissError(f"unknown config key '{path}'{_did_you_mean(key, out, where)}; "
                            f"valid keys here: {', '.join(sorted(out))}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, path, free_form)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flatten(cfg: Mapping[str, Any], where: str = "", free_form: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested config as {"train.epochs": 30, ...}; each `free_form` table stays one value."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{where}.{key}" if where else key
        if isinstance(value, dict) and path not in free_form:
            out.update(flatten(value, path, free_form))
        else:
            out[path] = value
    return out


def _typed(flag: str, key: str, value: Any) -> str:
    """How `flag` gives `key` the value: `--set train.epochs=30`, or `--epochs 30` for a flag of its own."""
    return f"--set {key}={toml_text(value)}" if flag == "--set" else f"{flag} {value}"


@dataclass(frozen=True)
class Settings:
    """One command's settings: where their defaults come from, and the rule of every key."""

    defaults: Callable[[], dict[str, Any]]  # nested tables, read afresh on each call
    rules: Mapping[str, Rule]               # every dotted key of the defaults
    listing: str   # where the keys are, for the refusal of an unknown one: "the keys are in FILE"
    example: str   # the `--set` assignment that refusal offers, e.g. "train.clip_grad_norm=3"
    free_form: tuple[str, ...] = ()  # tables whose keys another checks (a dataset reader's options)
    file_rules: Mapping[str, Rule] = field(default_factory=dict)  # keys only a config file sets
    file_examples: Mapping[str, Any] = field(default_factory=dict)  # what refusals of those offer
    elsewhere: Mapping[str, str] = field(default_factory=dict)  # sections --set refuses: what sets them

    @classmethod
    def table(cls, section: str, defaults: Mapping[str, Any], command: str, example: str,
              choices: Mapping[str, tuple[str, ...]] | None = None) -> Settings:
        """A command's settings declared in code, as the table `[section]`: each key of its default's
        type (one of `choices` where given)."""
        choices = choices or {}
        return cls(defaults=lambda: {section: copy.deepcopy(dict(defaults))},
                   rules={f"{section}.{k}": rule_for(v, tuple(choices.get(k, ()))) for k, v in defaults.items()},
                   listing=f"the keys of {command} are {', '.join(f'{section}.{k}' for k in defaults)}",
                   example=example)

    def flatten(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return flatten(cfg, free_form=self.free_form)

    def merge(self, base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
        return merge(base, override, free_form=self.free_form)

    def default(self, key: str) -> Any:
        """The default of `key`: what a refusal offers to type instead."""
        return self.file_examples[key] if key in self.file_examples else self.flatten(self.defaults())[key]

    def check_setting(self, key: str, value: Any, flag: str = "--set") -> Any:
        """`value` for the dotted key `key` as `flag` gave it (`--set`, or a flag of its own such as
        `--epochs`), in the key's type; refused with the flag to type when the key, type or range is wrong."""
        section = key.split(".")[0]
        if section in self.elsewhere:
            raise CissError(f"--set {key}: {self.elsewhere[section]}")
        if key.startswith(tuple(f"{table}." for table in self.free_form)):
            return value  # the table's reader checks its own keys
        if key not in self.rules:
            close = difflib.get_close_matches(key, list(self.rules), n=1, cutoff=0.5)
            hint = f"did you mean --set {close[0]}={toml_text(value)}?" if close else \
                f"{self.listing}, e.g. --set {self.example}"
            raise CissError(f"unknown setting '{key}' in --set {key}={toml_text(value)}; {hint}")
        problem = self.rules[key].problem(value)
        if problem:
            raise CissError(f"{_typed(flag, key, value)}: {key} {problem}; e.g. {_typed(flag, key, self.default(key))}")
        return self.rules[key].clean(value)

    def overrides(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Dotted settings ({"train.clip_grad_norm": 3}, as `--set`) as nested overrides, every key and
        type checked."""
        out: dict[str, Any] = {}
        for key, value in settings.items():
            value = self.check_setting(key, value)
            *sections, leaf = key.split(".")
            node = out
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
        return out

    def check_file(self, cfg: Mapping[str, Any], source: str) -> None:
        """Every key and value of a config file (`source` names it): an unknown key with the closest one
        suggested, a wrong type or range with the line to write instead."""
        rules = {**self.rules, **self.file_rules}

        def walk(node: Mapping[str, Any], where: str) -> None:
            for key, value in node.items():
                path = f"{where}.{key}" if where else key
                section = [k for k in rules if k.startswith(path + ".")]
                if path in rules:
                    problem = rules[path].problem(value)
                    line = f"{key} = {toml_text(self.default(path))}"
                    place = f" under [{where}]" if where else ""
                elif section:
                    problem = None if isinstance(value, dict) else f"must be a table, not {kind_of(value)}"
                    line, place = f"[{path}] and its keys", ""
                else:
                    here = sorted({k[len(where) + 1 if where else 0:].split(".")[0] for k in rules
                                   if not where or k.startswith(where + ".")})
                    raise CissError(f"unknown config key '{path}' in {source}{_did_you_mean(key, here, where)}; "
                                    f"valid keys here: {', '.join(here)}")
                if problem:
                    raise CissError(f"{path} = {toml_text(value)} in {source}: {path} {problem}; e.g. {line}{place}")
                if section:
                    walk(value, path)

        walk(cfg, "")

    def check_all(self, cfg: Mapping[str, Any]) -> None:
        """Every key of a resolved config (values a run carries, or that a caller passed as Python, too)."""
        flat = self.flatten(cfg)
        for key, rule in self.rules.items():
            problem = rule.problem(flat[key])
            if problem:
                raise CissError(f"{key} = {toml_text(flat[key])}: {key} {problem}; "
                                f"e.g. --set {key}={toml_text(self.default(key))}")

    def load(self, config: Path | Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
        """A config file's contents (or a config given as a dict), checked, and how refusals name it."""
        if isinstance(config, Mapping):
            cfg, source = copy.deepcopy(dict(config)), "the config"
        else:
            cfg, source = load_toml(Path(config)) if config else {}, str(config)
        self.check_file(cfg, source)
        return cfg, source

    def resolve(self, config: Path | Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None,
                *, under: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The defaults, then `under` (a run's own config), then `config` (a file, or its contents),
        then `overrides` (the command line's, nested and checked: see `overrides`)."""
        file_cfg, _ = self.load(config)
        cfg = self.defaults()
        for section in {key.split(".")[0] for key in self.file_rules} & set(file_cfg):
            cfg[section] = {}  # a table only files have starts empty
        for layer in (under or {}, file_cfg, overrides or {}):
            cfg = self.merge(cfg, layer)
        return cfg
