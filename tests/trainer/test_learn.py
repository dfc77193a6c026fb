"""Planning steps from flags: protocols, resuming a protocol, joint, and config resolution."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ciss.errors import CissError
from ciss.manifest import Normalisation
from ciss.trainer import presets
from ciss.trainer import step as steplib
from ciss.trainer.config import TRAINING
from ciss.trainer.data import open_dataset
from ciss.trainer.learn import learn, plan_steps
from ciss.trainer.store import RunStore


@pytest.fixture
def info():
    return open_dataset(None, None, "train", size=4, height=32, width=32).info


def test_protocol_plans_every_step(tmp_path: Path, info):
    plans = plan_steps(RunStore(tmp_path / "r"), info, None, None, "synthetic:6-2", joint=False)
    assert [p.step for p in plans] == [0, 1, 2]
    assert plans[0].classmap.names[1:] == list(info.learnable[:6])
    assert plans[2].classmap.names[1:] == list(info.learnable)
    # future classes are known for the disjoint filter
    assert plans[0].future_native == [info.class_names.index(n) for n in info.learnable[6:]]
    assert plans[2].future_native == []


def test_joint_is_one_step_with_everything(tmp_path: Path, info):
    (plan,) = plan_steps(RunStore(tmp_path / "r"), info, None, None, "synthetic:6-2", joint=True)
    assert plan.step == 0 and plan.classmap.names[1:] == list(info.learnable)
    assert plan.old_names == list(info.learnable[:6])  # the protocol's step 0: the old/new split of its metrics


def test_protocol_skips_steps_the_run_has(tmp_path: Path, fast_config: Path, info):
    run = tmp_path / "r"
    learn(run, task="synthetic:8-2", config_file=fast_config, method="ft", log=lambda s: None)
    assert RunStore(run).steps() == [0, 1]
    with pytest.raises(CissError, match="already has every step"):
        plan_steps(RunStore(run), info, None, None, "synthetic:8-2", joint=False)
    with pytest.raises(CissError, match="other classes"):
        plan_steps(RunStore(run), info, None, None, "synthetic:6-2", joint=False)


def test_flags_cannot_be_combined(tmp_path: Path, info):
    with pytest.raises(CissError, match="cannot be combined"):
        plan_steps(RunStore(tmp_path / "r"), info, ["sky"], None, "synthetic:6-2", joint=False)


def test_config_rejects_unknown_keys(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepoch = 3\n")
    with pytest.raises(CissError, match="unknown config key 'train.epoch'"):
        TRAINING.resolve(bad)
    cfg = TRAINING.resolve(None, {"train": {"epochs": 3}, "data": {"options": {"size": 5}}})
    assert cfg["train"]["epochs"] == 3 and cfg["data"]["options"] == {"size": 5}


def test_method_options_from_flags(tmp_path: Path, fast_config: Path):
    from click.testing import CliRunner

    from ciss.apps.cli import main

    run = tmp_path / "r"
    r = CliRunner().invoke(main, ["learn", "--run", str(run), "--classes", "sky,grass", "--config", str(fast_config),
                                  "--method", "plop", "--no", "plop.adaptive_factor",
                                  "--opt", "plop.threshold_mode=median", "--opt", "pod_weight=0.02"])
    assert r.exit_code == 0, r.output
    opts = RunStore(run).manifest(0).config["method"]["options"]
    assert opts == {"adaptive_factor": False, "threshold_mode": "median", "pod_weight": 0.02}
    # Options of another method, and unknown options, are refused before anything runs.
    r = CliRunner().invoke(main, ["learn", "--run", str(run), "--new-classes", "disk", "--method", "mib",
                                  "--opt", "plop.pod_weight=1"])
    assert r.exit_code == 2 and "belongs to method 'plop'" in r.stderr
    r = CliRunner().invoke(main, ["learn", "--run", str(run), "--new-classes", "disk", "--method", "mib",
                                  "--opt", "kd_wieght=1"])
    assert r.exit_code == 2 and "kd_wieght" in r.stderr
    assert RunStore(run).steps() == [0]


def test_run_older_than_a_config_key_continues(tmp_path: Path, fast_config: Path):
    """A key added to the defaults after a run began takes its default value at the next step."""
    import json

    run = tmp_path / "r"
    learn(run, classes=["sky", "grass"], config_file=fast_config, method="ft", log=lambda s: None)
    manifest = run / "step-0" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["config"]["train"]["clip_grad_norm"]
    manifest.write_text(json.dumps(m))
    learn(run, new_classes=["water"], method="mib", log=lambda s: None)
    assert RunStore(run).manifest(1).config["train"]["clip_grad_norm"] == 0.0


def _cli(*args: str):
    from click.testing import CliRunner

    from ciss.apps.cli import main

    return CliRunner().invoke(main, list(args))


def test_flags_apply_to_their_call_only(tmp_path: Path, fast_config: Path):
    """--epochs, --lr and --set train.* shape the call that gives them; the run carries its data, model,
    seed, method and config file, and a later step says so in one line."""
    run = tmp_path / "r"
    r = _cli("learn", "--run", str(run), "--classes", "sky,grass", "--config", str(fast_config), "--method", "ft",
             "--epochs", "2", "--lr", "0.05", "--seed", "3", "--set", "train.clip_grad_norm=3")
    assert r.exit_code == 0, r.output
    step0 = RunStore(run).manifest(0).config
    assert (step0["train"]["epochs"], step0["train"]["lr"], step0["train"]["clip_grad_norm"]) == (2, 0.05, 3.0)
    r = _cli("learn", "--run", str(run), "--new-classes", "water")
    assert r.exit_code == 0, r.output
    carried = [ln for ln in r.stderr.splitlines() if ln.startswith("carried over from step 0")]
    assert len(carried) == 1 and "seed=3" in carried[0] and "train.epochs_next=1" in carried[0], r.stderr
    assert "method=ft" in carried[0] and "lr" not in carried[0] and "clip_grad_norm" not in carried[0]
    step1 = RunStore(run).manifest(1).config
    defaults = TRAINING.defaults()["train"]
    assert step1["train"]["lr_next"] == defaults["lr_next"] and step1["train"]["clip_grad_norm"] == 0.0
    assert step1["train"]["epochs_next"] == 1 and step1["seed"] == 3  # the config file and --seed stay


def test_a_config_file_at_a_later_step_is_named_with_what_it_replaces(tmp_path: Path, fast_config: Path):
    """The carried-over line must not show a value that this call's --config replaced."""
    run = tmp_path / "r"
    assert _cli("learn", "--run", str(run), "--classes", "sky,grass", "--config", str(fast_config),
                "--method", "ft").exit_code == 0
    later = tmp_path / "later.toml"
    later.write_text(fast_config.read_text().replace("[train]", "[train]\nlr_next = 0.002", 1))
    r = _cli("learn", "--run", str(run), "--new-classes", "water", "--config", str(later))
    assert r.exit_code == 0, r.output
    carried = [ln for ln in r.stderr.splitlines() if ln.startswith("carried over from step 0")]
    assert len(carried) == 1 and f"; from {later}: " in carried[0] and "train.lr_next=0.002" in carried[0], r.stderr
    assert carried[0].count("train.lr_next") == 1
    assert RunStore(run).manifest(1).config["train"]["lr_next"] == 0.002


def test_a_flag_over_a_later_config_file_is_named_as_the_command_lines(tmp_path: Path, fast_config: Path):
    """`--seed 5` beats the file's seed: the carried-over line must not say the file's value is used."""
    run = tmp_path / "r"
    assert _cli("learn", "--run", str(run), "--classes", "sky,grass", "--config", str(fast_config),
                "--method", "ft", "--seed", "3").exit_code == 0
    later = tmp_path / "later.toml"
    later.write_text(re.sub(r"(?m)^seed = .*$", "seed = 0", fast_config.read_text()))
    r = _cli("learn", "--run", str(run), "--new-classes", "water", "--config", str(later), "--seed", "5")
    assert r.exit_code == 0, r.output
    carried = [ln for ln in r.stderr.splitlines() if ln.startswith("carried over from step 0")]
    assert len(carried) == 1 and "seed=0" not in carried[0] and carried[0].count("seed=") == 1, r.stderr
    assert carried[0].endswith("; from the command line: seed=5"), r.stderr
    assert RunStore(run).manifest(1).seed == 5


@pytest.mark.parametrize("args,fragment", [
    (["--set", "train.clip_grad_nrom=3"], "did you mean --set train.clip_grad_norm=3?"),
    (["--set", "train.epochs=many"], "train.epochs must be an integer, not a string; e.g. --set train.epochs=30"),
    (["--set", "method.kd_weight=1"], "--opt METHOD.KEY=VALUE"),
    (["--set", "train.epochs"], "is not KEY=VALUE; e.g. --set train.clip_grad_norm=3"),
    (["--opt", "train.clip_grad_norm=3"], "set it with --set train.clip_grad_norm=3"),
])
def test_setting_errors_name_the_flag(tmp_path: Path, fast_config: Path, args: list[str], fragment: str):
    run = tmp_path / "r"
    r = _cli("learn", "--run", str(run), "--classes", "sky", "--config", str(fast_config), *args)
    assert r.exit_code == 2 and fragment in r.stderr, r.stderr
    assert not run.exists()


def test_config_file_typo_suggests_the_key(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nclip_grad = 3\n")
    with pytest.raises(CissError, match="did you mean 'train.clip_grad_norm'"):
        TRAINING.resolve(bad)


def test_a_schedule_in_iterations_and_the_printed_plan(tmp_path: Path, fast_config: Path):
    """Issue 14.4: epochs scale with the dataset; --iterations does not, and each step prints its plan and time."""
    said: list[str] = []
    (manifest,) = learn(tmp_path / "r", classes=["sky", "grass"], config_file=fast_config, method="ft",
                        overrides={"train": {"iterations": 7}}, log=said.append)
    assert manifest["train"]["iterations"] == 7 and manifest["train"]["epochs"] == 2  # 24 images, batch 4: 6 a epoch
    assert any("7 iterations (1.16667 epochs of 6)" in s for s in said), said
    assert any(s.startswith("step 0: about ") and "per iteration" in s for s in said), said


def test_a_presets_normalisation_feeds_training_and_is_carried_by_the_run(tmp_path: Path, fast_config: Path,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """A preset's `mean` and `std` normalise step 0's training and eval images and go into its manifest;
    later steps keep the step before's (what the weights learned), whatever the preset says by then."""
    shipped = presets.model_presets()
    own = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4]}
    monkeypatch.setattr(presets, "model_presets", lambda: {**shipped, "tiny": {**shipped["tiny"], **own}})
    seen: list[tuple[str, Normalisation]] = []
    train_transform, eval_transform = steplib.TrainTransform, steplib.EvalTransform

    def spy_train(crop, normalisation, **options):
        seen.append(("train", normalisation))
        return train_transform(crop, normalisation, **options)

    def spy_eval(normalisation):
        seen.append(("eval", normalisation))
        return eval_transform(normalisation)

    monkeypatch.setattr(steplib, "TrainTransform", spy_train)
    monkeypatch.setattr(steplib, "EvalTransform", spy_eval)
    run = tmp_path / "r"
    learn(run, classes=["sky", "grass"], config_file=fast_config, method="ft", log=lambda s: None)
    expected = Normalisation((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    assert RunStore(run).manifest(0).normalisation == expected
    assert {kind for kind, _ in seen} == {"train", "eval"} and all(n == expected for _, n in seen)

    monkeypatch.setattr(presets, "model_presets", lambda: shipped)
    seen.clear()
    learn(run, new_classes=["water"], method="ft", log=lambda s: None)
    assert RunStore(run).manifest(1).normalisation == expected
    assert seen and all(n == expected for _, n in seen)
