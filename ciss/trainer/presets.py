"""Which models exist, by name: the registered backbones and the presets of configs/models.toml.

Torch-free, so that the command line lists and checks `--model` (and `ciss --help` runs) without
importing a network: each backbone entry is "module:attribute", imported when a model is built
(`ciss.trainer.models.build_model`). A registered backbone without a preset of its name is a model
under its own name with `DEFAULT_PRESET`, so a new backbone is its module and one entry here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ciss.config_paths import config_dir, load_toml
from ciss.manifest import IMAGENET, Normalisation
from ciss.trainer.registry import Registry

if TYPE_CHECKING:
    from ciss.trainer.models.features import Backbone

PRESETS_FILE = config_dir() / "models.toml"
# A backbone's model when configs/models.toml has no preset of its name: DeepLabV3 (ASPP at the default
# rates), 256 channels as in the paper, no ImageNet weights (`--pretrained FILE` gives some).
DEFAULT_PRESET: dict[str, Any] = {"decoder": "aspp", "aspp_channels": 256, "output_stride": 16}

BACKBONES: Registry[Callable[[int], Backbone]] = Registry("backbone", {
    "tiny": "ciss.trainer.models.tiny:TinyNet",
    "mobilenet_v3_large": "ciss.trainer.models.mobilenet:MobileNetV3Large",
    "mobilenet_v2": "ciss.trainer.models.mobilenet_v2:MobileNetV2",
    "efficientnet_lite0": "ciss.trainer.models.efficientnet_lite:EfficientNetLite0",
    "resnet50": "ciss.trainer.models.resnet:resnet50",
    "resnet101": "ciss.trainer.models.resnet:resnet101",
})  # each takes the output stride


def model_presets() -> dict[str, dict[str, Any]]:
    """Every model by name: the presets of `configs/models.toml` (tuned settings), then each registered
    backbone that has no preset of its name, as `DEFAULT_PRESET` on that backbone."""
    presets = load_toml(PRESETS_FILE, "model presets file")
    return presets | {name: {"description": f"{name} with DeepLabV3's defaults (no preset in {PRESETS_FILE.name})",
                             "backbone": name, **DEFAULT_PRESET} for name in BACKBONES if name not in presets}


def preset_normalisation(preset: str) -> Normalisation:
    """The input normalisation a preset trains with: its `mean` and `std`, else ImageNet's."""
    spec = model_presets().get(preset, {})
    if "mean" not in spec and "std" not in spec:
        return IMAGENET
    return Normalisation.from_json(spec.get("mean"), spec.get("std"), f"preset '{preset}' in {PRESETS_FILE}",
                                   "give both, or neither for ImageNet's")
