"""One resolved config per step: defaults < config file < command-line flags.

Configs are plain nested dicts of TOML data. Unknown keys are refused instead of ignored, so a
typo in a config file cannot silently train something else.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from ciss.config_paths import config_dir, load_toml
from ciss.errors import CissError
from ciss.trainer.schema import SCHEMA, Rule, Table, Text, kind_of


DEFAULT_METHOD = "mib"
FREE_FORM = ("method", "data.options")
# What one call's `--set` (and --epochs, --lr, ...) changes for that call only; a run carries every
# other key (data, model, seed) and its config file's values to its later steps.
PER_CALL = ("train", "eval")
CARRIED = "carried"  # a step config's record of the values its per-call flags replaced (dotted keys)


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
            raise CissError(f"unknown config key '{path}'{_did_you_mean(key, out, where)}; "
                            f"valid keys here: {', '.join(sorted(out))}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _did_you_mean(key: str, section: Mapping[str, Any], where: str) -> str:
    close = difflib.get_close_matches(key, list(section), n=1)
    return f" (did you mean '{where + '.' if where else ''}{close[0]}'?)" if close else ""


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


def flatten(cfg: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Nested config as {"train.epochs": 30, ...}; the free-form `data.options` stays one value."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{where}.{key}" if where else key
        if isinstance(value, dict) and path not in FREE_FORM:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def _typed(flag: str, key: str, value: Any) -> str:
    """How `flag` gives `key` the value: `--set train.epochs=30`, or `--epochs 30` for a flag of its own."""
    return f"--set {key}={toml_text(value)}" if flag == "--set" else f"{flag} {value}"


# A config file's `[method]` table, which only files have: the method's name and its options (which the
# method checks), with what a refusal offers instead.
FILE_ONLY: dict[str, Rule] = {"method.name": Text(), "method.options": Table()}
FILE_ONLY_EXAMPLES = {"method.name": DEFAULT_METHOD, "method.options": {}}


def example(key: str) -> Any:
    """The default of `key`: what a refusal offers to type instead."""
    return FILE_ONLY_EXAMPLES[key] if key in FILE_ONLY_EXAMPLES else flatten(defaults())[key]


def check_setting(key: str, value: Any, flag: str = "--set") -> Any:
    """`value` for the dotted config key `key` as `flag` gave it (`--set`, or a flag of its own such as
    `--epochs`), in the key's type; refused with the flag to type when the key, type or range is wrong."""
    if key == "method" or key.startswith("method."):
        raise CissError(f"--set {key}: choose the method with --method NAME and set its options with "
                        "--opt METHOD.KEY=VALUE, e.g. --opt gsc.kd_weight=10")
    if key.startswith("data.options."):
        return value  # the dataset reader checks its own options
    if key not in SCHEMA:
        close = difflib.get_close_matches(key, list(SCHEMA), n=1, cutoff=0.5)
        hint = f"did you mean --set {close[0]}={toml_text(value)}?" if close else \
            "the keys are in configs/defaults.toml, e.g. --set train.clip_grad_norm=3"
        raise CissError(f"unknown setting '{key}' in --set {key}={toml_text(value)}; {hint}")
    problem = SCHEMA[key].problem(value)
    if problem:
        raise CissError(f"{_typed(flag, key, value)}: {key} {problem}; e.g. {_typed(flag, key, example(key))}")
    return SCHEMA[key].clean(value)


def check_file(cfg: Mapping[str, Any], source: str) -> None:
    """Every key and value of a config file (`source` names it): an unknown key with the closest one
    suggested, a wrong type or range with the line to write instead."""
    rules = {**SCHEMA, **FILE_ONLY}

    def walk(node: Mapping[str, Any], where: str) -> None:
        for key, value in node.items():
            path = f"{where}.{key}" if where else key
            section = [k for k in rules if k.startswith(path + ".")]
            if path in rules:
                problem = rules[path].problem(value)
                line = f"{key} = {toml_text(example(path))}"
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


def check_resolved(cfg: Mapping[str, Any], world: int) -> None:
    """A step's whole config before anything runs: every key (values a run carries or a caller passed
    as Python too), then what needs two keys or the process count."""
    flat = flatten(cfg)
    for key, rule in SCHEMA.items():
        problem = rule.problem(flat[key])
        if problem:
            raise CissError(f"{key} = {toml_text(flat[key])}: {key} {problem}; "
                            f"e.g. --set {key}={toml_text(example(key))}")
    crop, stride = cfg["train"]["crop"], cfg["model"]["output_stride"]
    if crop < stride:
        raise CissError(f"train.crop {crop} is smaller than the model's output stride {stride}, which leaves "
                        f"no feature map; e.g. --crop {max(stride, example('train.crop'))}")
    batch = cfg["train"]["batch_size"]
    if batch % world:
        raise CissError(f"train.batch_size {batch} cannot be split evenly over {world} processes; "
                        f"e.g. --batch-size {-(-batch // world) * world}")


def settings_overrides(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted settings ({"train.clip_grad_norm": 3}) as nested overrides, every key and type checked."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        value = check_setting(key, value)
        *sections, leaf = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return out


def split_per_call(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the run carries, what applies to this call only) of nested overrides; see PER_CALL."""
    carried = {k: copy.deepcopy(v) for k, v in overrides.items() if k not in PER_CALL}
    per_call = {k: copy.deepcopy(v) for k, v in overrides.items() if k in PER_CALL}
    return carried, per_call


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
