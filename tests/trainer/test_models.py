"""Models: shapes and strides, torchvision key compatibility, pretrained loading, heads, BatchNorm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ciss.errors import CissError
from ciss.manifest import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, Normalisation
from ciss.trainer import presets
from ciss.trainer.models import build_model, load_pretrained, load_step_model, pretrained_weights
from ciss.trainer.presets import BACKBONES, model_presets, preset_normalisation
from ciss.trainer.models.efficientnet_lite import EfficientNetLite0
from ciss.trainer.models.features import Backbone
from ciss.trainer.models.mobilenet import MobileNetV3Large
from ciss.trainer.models.mobilenet_v2 import MobileNetV2
from ciss.trainer.models.norm import GlooSyncBatchNorm, convert_sync_batchnorm, freeze_batchnorm
from ciss.trainer.models.outputs import Outputs
from ciss.trainer.models.resnet import ResNet
from ciss.trainer.models.tiny import TinyNet
from ciss.trainer.registry import Registry

STAGES = ("stage1", "stage2", "stage3", "stage4")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def strides(backbone: nn.Module, size: int = 64) -> list[int]:
    with torch.no_grad():
        feats = backbone.eval()(torch.randn(1, 3, size, size))
    assert list(feats) == list(STAGES)
    assert [f.shape[1] for f in feats.values()] == backbone.stage_channels
    assert backbone.out_channels == backbone.stage_channels[-1]
    return [size // f.shape[-1] for f in feats.values()]


# --- presets, shapes, strides ------------------------------------------------------------------

def test_presets_and_unknown_preset():
    assert {"tiny", "mobilenet_v2", "efficientnet_lite0", "mobilenet_v3_large", "resnet50",
            "resnet101"} <= set(model_presets())
    with pytest.raises(CissError, match="unknown model preset 'nope'.*tiny"):
        build_model("nope", [3])


@pytest.mark.parametrize("preset", ["tiny", "mobilenet_v2", "mobilenet_v2_lraspp", "efficientnet_lite0",
                                    "mobilenet_v3_large", "mobilenet_v3_lraspp", "resnet50", "resnet101"])
def test_forward_shapes(preset):
    model = build_model(preset, [3, 2]).eval()
    assert model.num_classes == 5
    assert model.config == {"preset": preset, "output_stride": 16, "step_sizes": [3, 2]}
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        logits = model(x)
        out = model(x, features=True)
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 5, 65, 65)
    assert isinstance(out, Outputs) and torch.equal(out.logits, logits)
    assert set(out.features) == {*STAGES, "aspp", "logits_lowres"}
    assert out.features["aspp"].shape[1] == model.head.in_channels
    side = 9 if preset.endswith("lraspp") else 5  # LR-ASPP classifies at stride 8
    assert out.features["logits_lowres"].shape == (1, 5, side, side)


def test_stage_strides():
    assert strides(TinyNet(16)) == [4, 8, 16, 16]
    assert strides(TinyNet(8)) == [4, 8, 8, 8]
    assert strides(MobileNetV3Large()) == [4, 8, 16, 16]
    assert strides(MobileNetV2(16)) == [4, 8, 16, 16] and strides(MobileNetV2(8)) == [4, 8, 8, 8]
    assert strides(EfficientNetLite0(16)) == [4, 8, 16, 16] and strides(EfficientNetLite0(8)) == [4, 8, 8, 8]
    assert strides(ResNet(50, 16)) == [4, 8, 16, 16]
    assert strides(ResNet(50, 8)) == [4, 8, 8, 8]
    with pytest.raises(CissError, match="output stride 16 only"):
        MobileNetV3Large(8)
    with pytest.raises(CissError, match="output stride"):
        ResNet(50, 32)


def test_mobilenet_v2_undilated_is_torchvisions_classification_trunk():
    """At output stride 32 nothing dilates: every depthwise conv keeps dilation 1, as the ImageNet file was trained."""
    net = MobileNetV2(32)
    assert strides(net) == [4, 8, 16, 32] and net.output_stride == 32
    assert all(m.dilation == (1, 1) for m in net.modules() if isinstance(m, nn.Conv2d))
    assert any(m.dilation != (1, 1) for m in MobileNetV2(16).modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(CissError, match="8, 16 or 32"):
        MobileNetV2(4)


def test_a_backbone_registered_without_a_preset_is_a_model_by_its_name(monkeypatch: pytest.MonkeyPatch):
    """Its module and its registry entry make a new backbone usable: DeepLabV3's defaults, no ImageNet weights."""
    monkeypatch.setattr(presets, "BACKBONES", Registry("backbone", {**dict(presets.BACKBONES), "bare": TinyNet}))
    assert model_presets()["bare"] == {"description": "bare with DeepLabV3's defaults (no preset in models.toml)",
                                       "backbone": "bare", "decoder": "aspp", "aspp_channels": 256, "output_stride": 16}
    assert model_presets()["tiny"]["aspp_channels"] == 32  # a preset of the backbone's name wins
    assert pretrained_weights("bare", "auto") is None
    with pytest.raises(CissError, match="'bare' has no ImageNet weights"):
        pretrained_weights("bare", "imagenet")

    model = build_model("bare", [3])
    assert model.config == {"preset": "bare", "output_stride": 16, "step_sizes": [3]}
    assert model.aspp.rates == [6, 12, 18] and model.head.in_channels == 256
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 3, (2, 32, 32)))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    rebuilt = load_step_model(model.config, model.state_dict())
    assert type(rebuilt.backbone) is TinyNet and rebuilt.config == model.config


def test_aspp_rates_follow_output_stride():
    assert build_model("mobilenet_v3_large", [2]).aspp.rates == [6, 12, 18]
    assert build_model("tiny", [2]).aspp.rates == [1, 2, 3]
    model = build_model("tiny", [2], output_stride=8)
    assert model.aspp.rates == [2, 4, 6] and model.config["output_stride"] == 8


def test_resnet_dilation_like_torchvision():
    os16, os8 = ResNet(50, 16), ResNet(50, 8)
    # The replaced layer's first block keeps the previous dilation; later blocks use the new one.
    assert (os16.layer4[0].conv2.stride, os16.layer4[0].conv2.dilation) == ((1, 1), (1, 1))
    assert os16.layer4[0].downsample[0].stride == (1, 1)
    assert os16.layer4[1].conv2.dilation == (2, 2) and os16.layer3[1].conv2.dilation == (1, 1)
    assert (os8.layer3[0].conv2.dilation, os8.layer3[1].conv2.dilation) == ((1, 1), (2, 2))
    assert (os8.layer4[0].conv2.dilation, os8.layer4[1].conv2.dilation) == ((2, 2), (4, 4))


# --- torchvision compatibility -----------------------------------------------------------------

def test_resnet_state_dict_matches_torchvision():
    sd50 = ResNet(50).state_dict()
    # torchvision resnet50: 320 entries, 25,557,032 parameters, of which fc has 2 and 2,049,000.
    assert len(sd50) == 318
    assert sum(p.numel() for p in ResNet(50).parameters()) == 25_557_032 - 2_049_000
    shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.num_batches_tracked": (),
              "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
              "layer1.0.downsample.1.running_var": (256,), "layer2.0.conv2.weight": (128, 128, 3, 3),
              "layer3.5.bn3.bias": (1024,), "layer4.2.conv3.weight": (2048, 512, 1, 1)}
    assert {k: tuple(sd50[k].shape) for k in shapes} == shapes
    r101 = ResNet(101)
    sd101 = r101.state_dict()
    assert len(sd101) == 626 - 2 and "layer3.22.conv3.weight" in sd101 and "layer3.23.conv1.weight" not in sd101
    assert sum(p.numel() for p in r101.parameters()) == 44_549_160 - 2_049_000


def test_mobilenet_state_dict_matches_torchvision():
    net = MobileNetV3Large()
    sd = net.state_dict()
    assert all(k.startswith("features.") for k in sd)
    assert len(sd) == 308
    # torchvision mobilenet_v3_large: 5,483,032 parameters, 2,511,080 of them in the classifier.
    assert sum(p.numel() for p in net.parameters()) == 5_483_032 - 2_511_080
    shapes = {"features.0.0.weight": (16, 3, 3, 3), "features.0.1.running_mean": (16,),
              "features.1.block.0.0.weight": (16, 1, 3, 3), "features.1.block.1.0.weight": (16, 16, 1, 1),
              "features.2.block.0.0.weight": (64, 16, 1, 1), "features.4.block.1.0.weight": (72, 1, 5, 5),
              "features.4.block.2.fc1.weight": (24, 72, 1, 1), "features.4.block.2.fc2.bias": (72,),
              "features.4.block.3.1.weight": (40,), "features.5.block.2.fc1.weight": (32, 120, 1, 1),
              "features.13.block.2.fc1.weight": (168, 672, 1, 1), "features.15.block.2.fc1.bias": (240,),
              "features.15.block.3.0.weight": (160, 960, 1, 1), "features.16.0.weight": (960, 160, 1, 1),
              "features.16.1.num_batches_tracked": ()}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    bn = net.features[16][1]
    assert (bn.eps, bn.momentum) == (0.001, 0.1)
    dw = net.features[13].block[1][0]  # the last stage's stride-2 depthwise conv, dilated instead
    assert (dw.stride, dw.dilation, dw.padding) == ((1, 1), (2, 2), (4, 4))
    assert net.features[14].block[1][0].dilation == (2, 2)


def test_mobilenet_v2_state_dict_matches_torchvision():
    net = MobileNetV2()
    sd = net.state_dict()
    # torchvision mobilenet_v2: 314 entries, 3,504,872 parameters; features.18 (6 entries, 412,160
    # parameters) and the classifier (2 entries, 1,281,000) are not part of the backbone.
    assert len(sd) == 314 - 6 - 2
    assert sum(p.numel() for p in net.parameters()) == 3_504_872 - 412_160 - 1_281_000
    shapes = {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
              "features.1.conv.1.weight": (16, 32, 1, 1), "features.1.conv.2.running_var": (16,),
              "features.2.conv.0.0.weight": (96, 16, 1, 1), "features.2.conv.3.bias": (24,),
              "features.14.conv.1.0.weight": (576, 1, 3, 3), "features.17.conv.2.weight": (320, 960, 1, 1)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert net.features[0][1].eps == 1e-5
    dw = net.features[14].conv[1][0]  # stride 2 at stride 16: dilated instead
    assert (dw.stride, dw.dilation, dw.padding) == ((1, 1), (2, 2), (2, 2))
    os8 = MobileNetV2(8)
    assert os8.features[7].conv[1][0].dilation == (2, 2) and os8.features[14].conv[1][0].dilation == (4, 4)


def test_efficientnet_lite_keys_and_same_padding():
    net = EfficientNetLite0()
    sd = net.state_dict()
    # The checkpoint's 296 entries less the head conv and its BN (6) and the classifier (2).
    assert len(sd) == 296 - 6 - 2
    assert tuple(sd["_blocks.15._project_conv.weight"].shape) == (320, 1152, 1, 1)
    assert "_blocks.0._expand_conv.weight" not in sd and "_blocks.1._expand_conv.weight" in sd
    # TF SAME on an even side: a 3x3 stride-2 conv pads 0 before and 1 after.
    conv = net._blocks[1]._depthwise_conv
    x = torch.zeros(1, conv.in_channels, 8, 8)
    x[..., 0, 0] = 1.0
    with torch.no_grad():
        conv.weight.fill_(1.0)
        y = conv(x)
    assert y.shape[-2:] == (4, 4) and y[0, 0, 0, 0] == 1.0  # pixel (0,0) is inside the first window


def test_efficientnet_lite_folds_the_checkpoint_normalisation_exactly(tmp_path: Path):
    checkpoint = EfficientNetLite0()
    for m in checkpoint.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(checkpoint.state_dict(), tmp_path / "lite.pth")
    raw = EfficientNetLite0()
    raw.load_state_dict(checkpoint.state_dict())
    raw._conv_stem.pad_value = None  # the checkpoint's own convention: zero padding of its input
    folded = EfficientNetLite0()
    load_pretrained(folded, tmp_path / "lite.pth")
    pixels = torch.rand(1, 3, 46, 62)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        want = raw.eval()((255 * pixels - 127) / 128)["stage4"]
        got = folded.eval()((pixels - mean) / std)["stage4"]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_pretrained_auto_and_none_never_fetch():
    assert pretrained_weights("tiny", "auto") is None  # no weights listed for the preset
    assert pretrained_weights("mobilenet_v2", "none") is None
    with pytest.raises(CissError, match="has no ImageNet weights"):
        pretrained_weights("tiny", "imagenet")
    assert model_presets()["mobilenet_v2"]["weights"] == "mobilenet_v2_imagenet"


def test_presets_normalise_as_imagenet_unless_they_say_otherwise(monkeypatch: pytest.MonkeyPatch):
    assert all(preset_normalisation(p) == IMAGENET for p in model_presets())  # none ships its own
    shipped = model_presets()
    monkeypatch.setattr(presets, "model_presets", lambda: {**shipped, "gray": {"mean": [0.5] * 3, "std": [0.5] * 3},
                                                          "half": {"mean": [0.5] * 3}})
    assert preset_normalisation("gray") == Normalisation((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(CissError, match=r"preset 'half' in .*models\.toml: mean and std must be three numbers.*"
                                        "give both, or neither for ImageNet's$"):
        preset_normalisation("half")


# --- pretrained weights ------------------------------------------------------------------------

def test_pretrained_round_trip(tmp_path: Path):
    source = TinyNet()
    for p in source.parameters():
        nn.init.normal_(p)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if "num_batches" not in k}
    state["fc.weight"] = torch.zeros(10, 64)  # a classifier the backbone has no use for
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": state}, path)
    model = build_model("tiny", [3], pretrained=path)
    for k, v in source.state_dict().items():
        if "num_batches" not in k:
            assert torch.equal(model.backbone.state_dict()[k], v), k
    assert build_model("tiny", [3], pretrained="").config["preset"] == "tiny"  # "" means none


def test_pretrained_errors(tmp_path: Path):
    with pytest.raises(CissError, match="does not exist"):
        build_model("tiny", [3], pretrained=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CissError, match="cannot read"):
        build_model("tiny", [3], pretrained=garbage)
    other = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, other)
    with pytest.raises(CissError, match="no tensor of the tiny backbone"):
        build_model("tiny", [3], pretrained=other)
    state = TinyNet().state_dict()
    state["stem.0.weight"] = torch.zeros(8, 3, 5, 5)
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(CissError, match=r"1 shape mismatch.*stem\.0\.weight"):
        build_model("tiny", [3], pretrained=wrong)
    del state["stem.0.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(CissError, match=r"lack 1 of .*stem\.0\.weight"):
        build_model("tiny", [3], pretrained=partial)


# --- incremental head --------------------------------------------------------------------------

def test_mib_init_keeps_old_probabilities():
    model = build_model("tiny", [4]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        old = model(x).softmax(1)
        model.add_step(3, init_from_background=True)
        new = model(x).softmax(1)
    assert model.num_classes == 7 and model.config["step_sizes"] == [4, 3]
    torch.testing.assert_close(new[:, 1:4], old[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(new[:, 0] + new[:, 4:].sum(1), old[:, 0], atol=1e-5, rtol=0)
    bg, added = model.head.heads[0], model.head.heads[1]
    assert torch.equal(added.weight, bg.weight[0:1].expand_as(added.weight))
    assert torch.equal(added.bias, bg.bias[0].expand(3))


def test_add_step_default_init_and_fused_head():
    model = build_model("tiny", [3]).eval()
    model.add_step(2, init_from_background=False)
    assert model.head.step_sizes == [3, 2]
    assert not torch.equal(model.head.heads[1].weight[0], model.head.heads[0].weight[0])
    rng = torch.get_rng_state()
    fused = model.fused()
    assert torch.equal(torch.get_rng_state(), rng)  # exporting mid-run must not perturb training
    assert isinstance(fused.head, nn.Conv2d) and fused.head.out_channels == 5
    assert fused.config == model.config
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-6, rtol=0)
    assert len(model.head.heads) == 2  # the original keeps its per-step heads


def test_load_step_model_round_trip():
    model = build_model("tiny", [3])
    model.add_step(2, init_from_background=True)
    config = json.loads(json.dumps(model.config))
    rebuilt = load_step_model(config, model.state_dict()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    with pytest.raises(CissError, match="do not match"):
        load_step_model({**config, "step_sizes": [3]}, model.state_dict())
    with pytest.raises(CissError, match="malformed model config"):
        load_step_model({"preset": "tiny"}, model.state_dict())


@pytest.mark.parametrize("preset", ["tiny", "mobilenet_v3_large", "mobilenet_v2_lraspp"])
def test_batch_size_one_in_train_mode(preset):
    model = build_model(preset, [3]).train()
    out = model(torch.randn(1, 3, 64, 64), features=True)
    out.logits.mean().backward()
    pooling = model.aspp.gate[0] if preset.endswith("lraspp") else model.aspp.pool[0]
    assert pooling.weight.grad is not None


# --- BatchNorm ---------------------------------------------------------------------------------

def test_freeze_batchnorm():
    model = build_model("tiny", [3]).train()
    freeze_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    assert model.training and model.aspp.branches[0][0].weight.requires_grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.fixture
def gloo_world_of_one(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_bn(bn: nn.BatchNorm2d, x: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
    """Two training steps; returns output, input/affine grads and running statistics."""
    x = x.clone().requires_grad_(True)
    bn(x * 0.5)
    y = bn(x)
    (y * w).sum().backward()
    return [y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var, bn.num_batches_tracked]


@pytest.mark.parametrize("synced", [False, True], ids=["local", "global-stats-path"])
def test_gloo_sync_batchnorm_equals_batchnorm(gloo_world_of_one, monkeypatch, synced):
    if synced:  # exercise the all_reduce path; with one real rank it must reproduce BatchNorm2d
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    ref = nn.BatchNorm2d(6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    sync = GlooSyncBatchNorm.from_batchnorm(ref)
    x = torch.randn(4, 6, 5, 7) * 3 + 10
    w = torch.randn(4, 6, 5, 7)
    for a, b in zip(run_bn(sync, x, w), run_bn(ref, x, w)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    sync.eval(), ref.eval()
    torch.testing.assert_close(sync(x), ref(x))


def test_convert_sync_batchnorm_on_cpu():
    model = build_model("tiny", [3]).train()
    converted = convert_sync_batchnorm(build_model("tiny", [3]).train(), "cpu")
    converted.load_state_dict(model.state_dict())
    kinds = {type(m) for m in converted.modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == {GlooSyncBatchNorm}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted(x), model(x))


def _two_rank_worker(rank: int, store: str, out_dir: str, x: torch.Tensor, w: torch.Tensor,
                     ref: nn.BatchNorm2d) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        half = x.shape[0] // 2
        part = slice(rank * half, (rank + 1) * half)
        torch.save(run_bn(GlooSyncBatchNorm.from_batchnorm(ref), x[part], w[part]), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gloo_sync_batchnorm_two_processes(tmp_path: Path):
    """Two ranks with half a batch each match one BatchNorm2d on the whole batch, gradients included."""
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    x, w = torch.randn(4, 3, 6, 5) * 2 + 1, torch.randn(4, 3, 6, 5)
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path), x, w, ref),
                                nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    y, gx, gw, gb, mean, var, n = run_bn(ref, x, w)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([ranks[0][0], ranks[1][0]]), y, **close)
    torch.testing.assert_close(torch.cat([ranks[0][1], ranks[1][1]]), gx, **close)  # needs the reduced backward
    torch.testing.assert_close(ranks[0][2] + ranks[1][2], gw, **close)  # DDP sums (then averages) these
    torch.testing.assert_close(ranks[0][3] + ranks[1][3], gb, **close)
    for r in ranks:
        torch.testing.assert_close(r[4:], [mean, var, n], **close)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_keeps_the_contract(name: str):
    """What DeepLabV3 and the methods rely on: the declared channels and stride, and STAGES by name."""
    backbone = BACKBONES[name](16).eval()
    assert isinstance(backbone, Backbone) and backbone.output_stride == 16
    with torch.no_grad():
        feats = backbone(torch.zeros(1, 3, 64, 64))
    assert tuple(feats) == STAGES
    assert [f.shape[1] for f in feats.values()] == list(backbone.stage_channels)
    assert backbone.out_channels == backbone.stage_channels[-1] and feats[STAGES[-1]].shape[-1] == 64 // 16
