"""`ciss learn`'s settings: configs/defaults.toml < the run's < a config file < command-line flags.

`TRAINING` resolves them the way every command resolves its settings (ciss/config.py), with the rule
of every key in ciss/trainer/schema.py. What is particular to training is here: a run carries its
data, model and seed to its later steps while training flags apply to one call (`PER_CALL`), and
some checks need two keys or the process count (`check_resolved`).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from ciss.config import Settings
from ciss.config_paths import config_dir, load_toml
from ciss.config_rules import Table, Text
from ciss.errors import CissError
from ciss.trainer.schema import SCHEMA


DEFAULT_METHOD = "mib"
# What one call's `--set` (and --epochs, --lr, ...) changes for that call only; a run carries every
# other key (data, model, seed) and its config file's values to its later steps.
PER_CALL = ("train", "eval")
CARRIED = "carried"  # a step config's record of the values its per-call flags replaced (dotted keys)

TRAINING = Settings(
    defaults=lambda: load_toml(config_dir() / "defaults.toml"),
    rules=SCHEMA,
    listing="the keys are in configs/defaults.toml",
    example="train.clip_grad_norm=3",
    # `method` and `data.options` are free-form: the method and the dataset reader check them.
    free_form=("method", "data.options"),
    # A config file's `[method]` table, which only files have: the method's name and its options.
    file_rules={"method.name": Text(), "method.options": Table()},
    file_examples={"method.name": DEFAULT_METHOD, "method.options": {}},
    elsewhere={"method": "choose the method with --method NAME and set its options with --opt METHOD.KEY=VALUE, "
                         "e.g. --opt gsc.kd_weight=10"},
)


def check_resolved(cfg: Mapping[str, Any], world: int) -> None:
    """A step's whole config before anything runs: every key (values a run carries or a caller passed
    as Python too), then what needs two keys or the process count."""
    TRAINING.check_all(cfg)
    crop, stride = cfg["train"]["crop"], cfg["model"]["output_stride"]
    if crop < stride:
        raise CissError(f"train.crop {crop} is smaller than the model's output stride {stride}, which leaves "
                        f"no feature map; e.g. --crop {max(stride, TRAINING.default('train.crop'))}")
    batch = cfg["train"]["batch_size"]
    if batch % world:
        raise CissError(f"train.batch_size {batch} cannot be split evenly over {world} processes; "
                        f"e.g. --batch-size {-(-batch // world) * world}")


def split_per_call(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the run carries, what applies to this call only) of nested overrides; see PER_CALL."""
    carried = {k: copy.deepcopy(v) for k, v in overrides.items() if k not in PER_CALL}
    per_call = {k: copy.deepcopy(v) for k, v in overrides.items() if k in PER_CALL}
    return carried, per_call


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
