"""Parameter groups, their learning rates and per-group clipping (ciss/trainer/optim.py)."""

from __future__ import annotations

import pytest
import torch

from ciss.errors import CissError


def test_parameter_groups_and_their_learning_rates():
    """Every trainable parameter sits in one named group whose lr is the base lr times its multiplier."""
    from ciss.trainer.config import TRAINING
    from ciss.trainer.models import build_model
    from ciss.trainer.optim import lr_multipliers, param_groups, set_lr

    cfg = TRAINING.defaults()
    assert lr_multipliers(cfg, 1) == {"backbone": 1.0, "decoder": 1.0, "head_old": 1.0, "head_new": 10.0,
                                      "method": 1.0}
    assert lr_multipliers(cfg, 0)["backbone"] == 1.0
    assert lr_multipliers(cfg, 0, pretrained=True)["backbone"] == 0.1
    assert lr_multipliers(cfg, 0, pretrained=True)["head_new"] == 1.0
    cfg["train"]["lr_mult_next"]["decoder"] = -1
    with pytest.raises(CissError, match="lr_mult_next.decoder"):
        lr_multipliers(cfg, 1)

    model = build_model("tiny", [3])
    extra = torch.nn.Parameter(torch.zeros(2))
    groups = param_groups(model, [extra], 0, lr_multipliers(TRAINING.defaults(), 0))
    assert [g["name"] for g in groups] == ["backbone", "decoder", "head_new", "method"]
    model.add_step(2, init_from_background=True)
    groups = param_groups(model, [], 1, lr_multipliers(TRAINING.defaults(), 1))
    assert [g["name"] for g in groups] == ["backbone", "decoder", "head_old", "head_new"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert {id(p) for p in groups[3]["params"]} == {id(p) for p in model.head.heads[1].parameters()}
    opt = torch.optim.SGD(groups, lr=1.0)
    set_lr(opt, 0.001)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.001, 0.001, pytest.approx(0.01)]


def test_clipping_is_per_group_and_never_touches_the_heads():
    from ciss.trainer.optim import clip_groups

    params = {name: torch.nn.Parameter(torch.zeros(4)) for name in ("backbone", "decoder", "head_new")}
    opt = torch.optim.SGD([{"params": [p], "name": k} for k, p in params.items()], lr=1.0)
    for k, scale in (("backbone", 100.0), ("decoder", 0.5), ("head_new", 50.0)):
        params[k].grad = torch.full((4,), scale / 2)  # norm = scale
    norms = clip_groups(opt, 3.0, measure=True)
    assert norms == {"gradnorm_backbone": 100.0, "gradnorm_decoder": 0.5, "gradnorm_head_new": 50.0}
    assert float(params["backbone"].grad.norm()) == pytest.approx(3.0)  # clipped on its own
    assert float(params["decoder"].grad.norm()) == pytest.approx(0.5)  # not scaled by the backbone's norm
    assert float(params["head_new"].grad.norm()) == pytest.approx(50.0)  # heads are never clipped
    assert clip_groups(opt, 3.0, measure=False) == {}
