"""Model presets: build a segmentation model (DeepLabV3 or LR-ASPP decoder) by name, optionally on local ImageNet weights, and rebuild saved steps.

Presets live in `configs/models.toml`. A model's `.config` holds exactly the arguments of
`build_model` (preset, output stride, step sizes), so a step's checkpoint rebuilds with
`load_step_model(config, state_dict)`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ciss.config_paths import config_dir, load_toml
from ciss.errors import CissError
from ciss.manifest import IMAGENET, Normalisation
from ciss.weights import ResolvedWeights, resolve_pretrained
from ciss.trainer.models.deeplab import DeepLabV3
from ciss.trainer.models.efficientnet_lite import EfficientNetLite0
from ciss.trainer.models.features import Backbone
from ciss.trainer.models.heads import IncrementalHead
from ciss.trainer.models.mobilenet import MobileNetV3Large
from ciss.trainer.models.mobilenet_v2 import MobileNetV2
from ciss.trainer.models.resnet import ResNet
from ciss.trainer.models.tiny import TinyNet
from ciss.trainer.registry import Registry

__all__ = ["DeepLabV3", "IncrementalHead", "build_model", "load_pretrained", "load_step_model", "model_presets",
           "preset_normalisation", "pretrained_weights"]

log = logging.getLogger(__name__)

PRESETS_FILE = config_dir() / "models.toml"
DEFAULT_ASPP_RATES = (6, 12, 18)  # at output stride 16; doubled at 8
DECODERS = ("aspp", "lraspp")

BACKBONES: Registry[Callable[[int], Backbone]] = Registry("backbone", {
    "tiny": TinyNet,
    "mobilenet_v3_large": MobileNetV3Large,
    "mobilenet_v2": MobileNetV2,
    "efficientnet_lite0": EfficientNetLite0,
    "resnet50": lambda output_stride: ResNet(50, output_stride),
    "resnet101": lambda output_stride: ResNet(101, output_stride),
})  # each takes the output stride


def model_presets() -> dict[str, dict[str, Any]]:
    """Every preset of `configs/models.toml`, by name."""
    return load_toml(PRESETS_FILE, "model presets file")


def pretrained_weights(preset: str, value: str, log: Callable[[str], None] | None = None) -> ResolvedWeights | None:
    """The checked weights file that `model.pretrained = value` means for `preset` (None for none).

    "imagenet" is the preset's `weights` entry; "auto" is that when the preset has one, else none.
    """
    known = str(model_presets().get(preset, {}).get("weights", ""))
    return resolve_pretrained(value, known, preset, log or (lambda s: None))


def preset_normalisation(preset: str) -> Normalisation:
    """The input normalisation a preset trains with: its `mean` and `std`, else ImageNet's."""
    spec = model_presets().get(preset, {})
    if "mean" not in spec and "std" not in spec:
        return IMAGENET
    return Normalisation.from_json(spec.get("mean"), spec.get("std"), f"preset '{preset}' in {PRESETS_FILE}",
                                   "give both, or neither for ImageNet's")


def build_model(preset: str, step_sizes: list[int], output_stride: int | None = None,
                pretrained: str | Path | None = None) -> DeepLabV3:
    """A fresh DeepLabV3 with one head per entry of `step_sizes` (background counted in step 0).

    `output_stride` None takes the preset's default. `pretrained` (None or "" for none) is a local
    file with ImageNet weights in the backbone's key names (`ciss.weights.resolve_pretrained` finds
    or fetches a known one).
    """
    presets = model_presets()
    if preset not in presets:
        raise CissError(f"unknown model preset '{preset}'; available: {', '.join(presets)}")
    spec = presets[preset]
    if spec.get("backbone", "") not in BACKBONES:
        raise CissError(f"preset '{preset}' in {PRESETS_FILE} names backbone {spec.get('backbone')!r}; "
                        f"use one of {', '.join(BACKBONES)}")
    decoder = spec.get("decoder", "aspp")
    if decoder not in DECODERS:
        raise CissError(f"preset '{preset}' in {PRESETS_FILE} names decoder {decoder!r}; use one of {', '.join(DECODERS)}")
    try:
        channels = int(spec["aspp_channels"])
        rates = [int(r) for r in spec.get("aspp_rates", DEFAULT_ASPP_RATES)]
        output_stride = int(output_stride or spec.get("output_stride", 16))
    except (KeyError, TypeError, ValueError) as e:
        raise CissError(f"preset '{preset}' in {PRESETS_FILE} is malformed ({e!r}); it needs an integer "
                        "aspp_channels and optional integer aspp_rates/output_stride") from e
    backbone = BACKBONES[spec["backbone"]](output_stride)
    if pretrained:
        load_pretrained(backbone, pretrained, preset)
    scaled = [r * 16 // backbone.output_stride for r in rates] if decoder == "aspp" else None
    return DeepLabV3(backbone, list(step_sizes), channels, scaled, preset)


def load_pretrained(backbone: nn.Module, path: str | Path, name: str = "backbone") -> int:
    """Load ImageNet weights (torchvision key names) into `backbone`; returns how many tensors loaded.

    Accepts a raw state_dict or one under "state_dict"/"model"; a "module."/"backbone." prefix is
    stripped and entries the backbone lacks (a classifier's `fc.*`, `classifier.*`) are ignored.
    Every backbone tensor must be present with the right shape: a partial load would silently train
    from a half-initialised network. A backbone whose checkpoint expects another input normalisation
    has a `convert_pretrained(state) -> state` that folds it into its first layers.
    """
    path = Path(path)
    if not path.is_file():
        raise CissError(f"pretrained weights file {path} does not exist; pass a local ImageNet checkpoint "
                        "or --pretrained imagenet")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle means the file is not a checkpoint we can use
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CissError(f"cannot read pretrained weights {path} ({first}); expected a torch.save'd state_dict") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CissError(f"pretrained weights {path} hold a {type(obj).__name__}, not a state_dict")
    state = {k.removeprefix("module.").removeprefix("backbone."): v
             for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    convert = getattr(backbone, "convert_pretrained", None)
    own = backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise CissError(f"pretrained weights {path} have no tensor of the {name} backbone (expected torchvision "
                        f"names such as '{next(iter(own))}'); pass ImageNet weights of that architecture")
    bad = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in matched.items() if v.shape != own[k].shape]
    if bad:
        raise CissError(f"pretrained weights {path} do not fit the {name} backbone: {len(bad)} shape "
                        f"mismatch(es), e.g. {bad[0]}; pass ImageNet weights of that architecture")
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    if missing:
        raise CissError(f"pretrained weights {path} lack {len(missing)} of the {name} backbone's tensors "
                        f"(e.g. {missing[0]}); pass complete ImageNet weights of that architecture")
    backbone.load_state_dict(convert(matched) if convert else matched, strict=False)
    log.info("loaded %d backbone tensors from %s (%d other entries ignored)", len(matched), path,
             len(obj) - len(matched))
    return len(matched)


def load_step_model(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> DeepLabV3:
    """Rebuild a model from its `.config` and load its weights strictly."""
    try:
        model = build_model(str(config["preset"]), [int(n) for n in config["step_sizes"]],
                            int(config["output_stride"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CissError(f"malformed model config {dict(config)!r} ({e!r}); the checkpoint is damaged") from e
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CissError(f"weights do not match model config {dict(config)}: {detail[:300]}; "
                        "the checkpoint is damaged or from another model") from e
    return model
