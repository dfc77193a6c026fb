"""The one resolver (ciss/config.py): defaults < a run's < a config file < the command line, for every
command; unknown keys refused with the closest one, values checked against their key's rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciss.config import Settings
from ciss.errors import CissError
from ciss.export.settings import EXPORT
from ciss.runtime.settings import LIVE

TOY = Settings.table("toy", {"speed": 1.5, "steps": 3, "mode": "fast", "loud": False}, command="ciss toy",
                     example="toy.steps=4", choices={"mode": ("fast", "slow")})


def test_layers_apply_in_order(tmp_path: Path):
    assert TOY.resolve() == {"toy": {"speed": 1.5, "steps": 3, "mode": "fast", "loud": False}}
    config = tmp_path / "c.toml"
    config.write_text('[toy]\nsteps = 5\nmode = "slow"\n')
    cfg = TOY.resolve(config, TOY.overrides({"toy.steps": 7}), under={"toy": {"loud": True, "steps": 9}})
    assert cfg == {"toy": {"speed": 1.5, "steps": 7, "mode": "slow", "loud": True}}


def test_types_follow_the_defaults():
    assert TOY.check_setting("toy.speed", 2) == 2.0 and isinstance(TOY.check_setting("toy.speed", 2), float)
    with pytest.raises(CissError, match=r"^--set toy.steps=1.5: toy.steps must be an integer, not a float; "
                                        r"e.g. --set toy.steps=3$"):
        TOY.check_setting("toy.steps", 1.5)
    with pytest.raises(CissError, match=r"^--steps 1.5: toy.steps must be an integer"):
        TOY.check_setting("toy.steps", 1.5, "--steps")
    with pytest.raises(CissError, match="toy.mode must be one of 'fast', 'slow'"):
        TOY.check_setting("toy.mode", "medium")
    with pytest.raises(CissError, match="toy.loud must be true or false, not a string"):
        TOY.overrides({"toy.loud": "yes"})


def test_unknown_keys_are_refused_with_the_closest(tmp_path: Path):
    with pytest.raises(CissError, match=r"did you mean --set toy.steps=4\?"):
        TOY.check_setting("toy.stesp", 4)
    with pytest.raises(CissError, match=r"the keys of ciss toy are toy.speed, toy.steps, toy.mode, toy.loud, "
                                        r"e.g. --set toy.steps=4$"):
        TOY.check_setting("nothing.like.it", 4)
    config = tmp_path / "c.toml"
    config.write_text("[toy]\nsped = 2.0\n")
    with pytest.raises(CissError, match=r"unknown config key 'toy.sped' in .*c.toml \(did you mean 'toy.speed'\?\)"):
        TOY.resolve(config)
    config.write_text("[toys]\nspeed = 2.0\n")
    with pytest.raises(CissError, match="unknown config key 'toys'"):
        TOY.resolve(config)


@pytest.mark.parametrize("settings", [EXPORT, LIVE], ids=["export", "live"])
def test_every_default_passes_its_own_rule(settings: Settings):
    settings.check_all(settings.defaults())
    assert settings.resolve() == settings.defaults()
