"""One step end to end on the synthetic scenes: steps, manifests, reports, resume, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ciss.trainer.learn import learn
from ciss.trainer.store import RunStore, load_step
from conftest import CISS, REPO, write_config


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def test_two_steps_manifest_and_reports(tmp_path: Path, fast_config: Path):
    run = tmp_path / "run"
    learn(run, classes=["sky", "grass", "disk"], config_file=fast_config, method="ft", log=lambda s: None)
    learn(run, new_classes=["box"], config_file=fast_config, method="mib", log=lambda s: None)
    store = RunStore(run)
    assert store.steps() == [0, 1]
    m1 = store.manifest(1)
    cmap = m1.classes
    assert cmap.names == ["background", "sky", "grass", "disk", "box"]
    assert [c.step for c in cmap] == [0, 0, 0, 0, 1]
    assert m1.parent["sha256"] == store.manifest(0).weights.sha256
    assert m1.model["step_sizes"] == [4, 1]
    assert m1.method == "mib" and m1.seed == 0 and "torch" in m1.versions
    assert set(m1.metrics) >= {"miou_all", "miou_old", "miou_new", "per_class"}
    # Loading needs nothing but the folder, and weights load with weights_only.
    model, _ = load_step(run / "step-1")
    assert model.num_classes == 5
    torch.load(run / "step-1" / "model.pt", weights_only=True)
    for name in ("results.csv", "results.md", "forgetting.png"):
        assert (run / name).exists()
    assert (run / "step-1" / "metrics.json").exists() and (run / "step-1" / "train_log.jsonl").exists()
    # each step's per-class IoU bars and confusion matrix (tests/trainer/test_plots.py: what they show)
    for k in (0, 1):
        for name, shape in (("iou.png", (500, 900, 3)), ("confusion.png", (600, 710, 3))):
            image = cv2.imread(str(run / f"step-{k}" / name))
            assert image is not None and image.shape == shape, (k, name)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    # confusion.csv holds the counts behind the step's metrics: its IoU per class is metrics.json's
    with open(run / "step-1" / "confusion.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["ground_truth\\predicted", *cmap.names] and [r[0] for r in rows] == cmap.names
    counts = np.array([[int(v) for v in r[1:]] for r in rows])
    tp, gt, pred = counts.diagonal(), counts.sum(axis=1), counts.sum(axis=0)
    iou = {name: tp[i] / (gt[i] + pred[i] - tp[i]) for i, name in enumerate(cmap.names) if gt[i] > 0}
    assert iou.keys() == m1.metrics["per_class"].keys()
    assert iou == pytest.approx(m1.metrics["per_class"], abs=1e-12)


def test_tensorboard_events_stay_with_the_step(tmp_path: Path, fast_config: Path):
    """With tensorboard installed, the event files written in the step's working folder are committed
    with the step (the working folder itself is removed)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard is optional and not installed here")
    run = tmp_path / "run"
    learn(run, classes=["sky", "grass", "disk"], config_file=fast_config, method="ft", log=lambda s: None)
    events = list((run / "step-0" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    logged = event_accumulator.EventAccumulator(str(events[0]))
    logged.Reload()
    assert "loss" in logged.Tags()["scalars"] and logged.Scalars("loss")
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_commit_keeps_files_in_subfolders(tmp_path: Path):
    """Extra files may sit in folders of the step (TensorBoard's events); they are written whole."""
    store = RunStore(tmp_path / "run")
    final = store.commit(0, {"w": torch.zeros(2)}, {"classes": []},
                         {"metrics.json": b"{}", "tensorboard/a/events.1": b"abc"})
    assert (final / "tensorboard" / "a" / "events.1").read_bytes() == b"abc"
    assert (final / "metrics.json").read_bytes() == b"{}"


def test_old_model_stays_frozen_in_eval(tmp_path: Path, fast_config: Path, monkeypatch):
    """The teacher is in eval mode with no gradients at every batch of a step > 0."""
    from ciss.trainer.methods import mib

    seen = []
    cls = next(v for v in vars(mib).values() if isinstance(v, type) and getattr(v, "name", "") == "mib")
    original = cls.losses

    def spy(self, batch):
        old = self.ctx.old_model
        seen.append((old.training, any(p.requires_grad for p in old.parameters()), batch.old is not None
                     and not batch.old.logits.requires_grad))
        return original(self, batch)

    monkeypatch.setattr(cls, "losses", spy)
    run = tmp_path / "run"
    learn(run, classes=["sky", "grass"], config_file=fast_config, method="ft", log=lambda s: None)
    learn(run, new_classes=["disk"], config_file=fast_config, method="mib", log=lambda s: None)
    assert seen and all(s == (False, False, True) for s in seen)


def test_resume_after_kill_matches_uninterrupted(tmp_path: Path):
    cfg = write_config(tmp_path / "c.toml", size=40, epochs=6, checkpoint_every=3)
    base = [*CISS, "learn", "--classes", "sky,grass,disk", "--config", str(cfg), "--method", "ft"]
    subprocess.run([*base, "--run", str(tmp_path / "full")], check=True, env=_env(), capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen([*base, "--run", str(run)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run / ".partial-step-0" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (run / "step-0").exists(), "the run should have been killed mid-step"
    it = torch.load(ckpt, weights_only=True)["iteration"]
    assert 0 < it < 60

    subprocess.run([*base, "--run", str(run), "--resume"], check=True, env=_env(), capture_output=True)
    a = torch.load(tmp_path / "full" / "step-0" / "model.pt", weights_only=True)
    b = torch.load(run / "step-0" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k



class Interrupted(Exception):
    """Stands for a kill: raised from a batch after the step's first checkpoint."""


def test_resumed_step_makes_no_second_estimation_pass(tmp_path: Path, monkeypatch):
    """GSC estimates PLOP's thresholds and its prototypes with a pass of the old model over the data;
    a resumed step restores both from its checkpoint instead of passing over the data again, and ends
    with the weights of an uninterrupted step."""
    from ciss.trainer.methods.gsc import GSC
    from ciss.trainer.methods.plop import PLOP

    cfg = write_config(tmp_path / "c.toml", size=24, epochs=2, checkpoint_every=4)  # 6 iterations per epoch
    run = tmp_path / "run"
    learn(run, classes=["sky", "grass", "disk"], config_file=cfg, method="ft", log=lambda s: None)
    full = tmp_path / "full"
    shutil.copytree(run, full)
    passes: list[str] = []

    def counted(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def spy(self, ctx):
            passes.append(name)
            return original(self, ctx)

        monkeypatch.setattr(cls, name, spy)

    counted(PLOP, "estimate_thresholds")
    counted(GSC, "estimate_prototypes")
    learn(full, new_classes=["box"], config_file=cfg, method="gsc", log=lambda s: None)
    assert passes == ["estimate_thresholds", "estimate_prototypes"]

    calls = []
    losses = GSC.losses

    def interrupt(self, batch):
        calls.append(1)
        if len(calls) == 6:  # iteration 6: the checkpoint of iteration 4 is on disk
            raise Interrupted
        return losses(self, batch)

    monkeypatch.setattr(GSC, "losses", interrupt)
    with pytest.raises(Interrupted):
        learn(run, new_classes=["box"], config_file=cfg, method="gsc", log=lambda s: None)
    assert torch.load(run / ".partial-step-1" / "checkpoint.pt", weights_only=True)["iteration"] == 4
    monkeypatch.setattr(GSC, "losses", losses)
    passes.clear()
    learn(run, new_classes=["box"], config_file=cfg, method="gsc", resume=True, log=lambda s: None)
    assert passes == []
    a = torch.load(full / "step-1" / "model.pt", weights_only=True)
    b = torch.load(run / "step-1" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_torchrun_two_processes_match_one(tmp_path: Path):
    """Two gloo processes with half the batch each train the weights one process trains: step 0
    (synchronised BatchNorm) and a PLOP step 1 (frozen teacher, features, thresholds reduced
    across processes, frozen BatchNorm)."""
    cfg = write_config(tmp_path / "c.toml", size=16, epochs=2)
    cfg.write_text(cfg.read_text().replace("crop = 48", "crop = 40\nscale = [1.0, 1.0]"))
    steps = [["--classes", "sky,grass,disk", "--method", "ft"], ["--new-classes", "box", "--method", "plop"]]
    for name, launcher in (("one", [*CISS]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", "-m", "ciss.apps.cli", "--"])):
        for args in steps:
            r = subprocess.run([*launcher, "learn", "--run", str(tmp_path / name), "--config", str(cfg),
                                "--device", "cpu", *args], env=_env(), capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
    for step in (0, 1):
        a = torch.load(tmp_path / "one" / f"step-{step}" / "model.pt", weights_only=True)
        b = torch.load(tmp_path / "two" / f"step-{step}" / "model.pt", weights_only=True)
        for k in a:
            if a[k].is_floating_point():
                assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3), (step, k)
        m1 = json.loads((tmp_path / "one" / f"step-{step}" / "manifest.json").read_text())
        m2 = json.loads((tmp_path / "two" / f"step-{step}" / "manifest.json").read_text())
        assert m2["train"]["processes"] == 2
        assert m1["metrics"]["miou_all"] == pytest.approx(m2["metrics"]["miou_all"], abs=1e-3)


def test_gradient_clipping_bounds_the_update(tmp_path: Path, fast_config: Path):
    """With a vanishing clip norm a later step leaves the backbone where it was; without, it moves."""
    learn(tmp_path / "a", classes=["sky", "grass", "water"], config_file=fast_config, method="ft", log=lambda s: None)
    before = load_step(tmp_path / "a" / "step-0")[0].state_dict()
    moved = {}
    for clip in (0.0, 1e-9):
        run = tmp_path / f"clip{clip}"
        shutil.copytree(tmp_path / "a", run)
        train = {"clip_grad_norm": clip, "lr_next": 0.1, "weight_decay": 0.0}
        learn(run, new_classes=["disk"], method="ft", overrides={"train": train}, log=lambda s: None)
        after = load_step(run / "step-1")[0].state_dict()
        moved[clip] = sum(float((after[k] - v).abs().sum()) for k, v in before.items()
                          if k.startswith("backbone") and v.is_floating_point())
    assert moved[0.0] > 0 and moved[1e-9] < 1e-3 * moved[0.0], moved


def test_a_group_with_multiplier_zero_stays_put(tmp_path: Path, fast_config: Path):
    """lr_mult_next trains only the groups it gives a rate: here the new head alone moves."""
    learn(tmp_path / "r", classes=["sky", "grass"], config_file=fast_config, method="ft", log=lambda s: None)
    before = load_step(tmp_path / "r" / "step-0")[0].state_dict()
    mult = {"backbone": 0.0, "decoder": 0.0, "head_old": 0.0, "head_new": 10.0, "method": 0.0}
    learn(tmp_path / "r", new_classes=["disk"], method="mib", log=lambda s: None,
          overrides={"train": {"lr_mult_next": mult, "weight_decay": 0.0}})
    after = load_step(tmp_path / "r" / "step-1")[0].state_dict()
    for k, v in before.items():
        if k == "head.heads.0.bias":  # MiB's initialisation lowers the background bias, training does not
            assert torch.equal(after[k][1:], v[1:]), k
        elif v.is_floating_point():
            assert torch.equal(after[k], v), k
    init = before["head.heads.0.weight"][:1]  # MiB: the new head starts as a copy of the background's
    assert not torch.equal(after["head.heads.1.weight"], init)


def test_gradient_norm_logging_leaves_the_weights_unchanged(tmp_path: Path):
    """Per-term gradient norms in the train log at every iteration, and bit-identical weights to a
    run that logs only at its end."""
    runs = {}
    for every in (1, 1000):
        cfg = write_config(tmp_path / f"c{every}.toml", size=16, epochs=2)
        cfg.write_text(cfg.read_text().replace("log_every = 5", f"log_every = {every}\nclip_grad_norm = 1.0"))
        run = tmp_path / f"log{every}"
        learn(run, classes=["sky", "grass", "disk"], config_file=cfg, method="ft", log=lambda s: None)
        learn(run, new_classes=["box"], config_file=cfg, method="plop", log=lambda s: None)
        runs[every] = run
    rows = [json.loads(line) for line in (runs[1] / "step-1" / "train_log.jsonl").read_text().splitlines()]
    manifest = RunStore(runs[1]).manifest(1)
    assert manifest.method_report["thresholds_from"] in ("plop", "median")  # PLOP says which routine ran
    assert RunStore(runs[1]).manifest(0).method_report == {}
    iterations = manifest.train["iterations"]
    assert len(rows) == iterations > 1 and {"gradnorm_ce", "gradnorm_pod", "gradnorm_backbone", "gradnorm_head_new"} <= set(rows[0])
    assert all(r["gradnorm_ce"] > 0 and r["gradnorm_pod"] >= 0 for r in rows)
    assert len((runs[1000] / "step-1" / "train_log.jsonl").read_text().splitlines()) == 1
    for step in (0, 1):
        a = torch.load(runs[1] / f"step-{step}" / "model.pt", weights_only=True)
        b = torch.load(runs[1000] / f"step-{step}" / "model.pt", weights_only=True)
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)


def _logged(path: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def test_resumed_train_log_holds_each_iteration_once(tmp_path: Path):
    """Killed after logging past its last checkpoint, the resumed step logs those iterations again;
    the log keeps them once (jsonl and csv)."""
    cfg = write_config(tmp_path / "c.toml", size=40, epochs=6, checkpoint_every=20)  # 60 iterations, log every 5
    base = [*CISS, "learn", "--classes", "sky,grass,disk", "--config", str(cfg), "--method", "ft"]
    run = tmp_path / "r"
    partial = run / ".partial-step-0"
    proc = subprocess.Popen([*base, "--run", str(run)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (partial / "checkpoint.pt").exists() and (partial / "train_log.jsonl").exists():
                proc.send_signal(signal.SIGSTOP)  # frozen, the files can be read without a race
                ckpt = torch.load(partial / "checkpoint.pt", weights_only=True)["iteration"]
                if max(_logged(partial / "train_log.jsonl")) > ckpt:
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert not (run / "step-0").exists() and max(_logged(partial / "train_log.jsonl")) > ckpt, \
        "the run should have been killed after logging past its checkpoint"

    subprocess.run([*base, "--run", str(run), "--resume"], check=True, env=_env(), capture_output=True, timeout=300)
    expected = list(range(5, 61, 5))
    assert _logged(run / "step-0" / "train_log.jsonl") == expected
    rows = (run / "step-0" / "train_log.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,") and [int(r.split(",")[0]) for r in rows[1:]] == expected


@pytest.mark.parametrize("next_args", [["--classes", "sky,grass,disk", "--resume"], ["--new-classes", "box"]])
def test_kill_after_commit_is_recovered_by_the_next_learn(tmp_path: Path, next_args: list[str]):
    """Killed between the step folder's rename and the run's reports: the next `learn` on the run, with
    or without --resume, writes the reports, removes the committed step's partial folder and the staging
    folders of dead processes, and says so."""
    cfg = write_config(tmp_path / "c.toml", size=16, epochs=2, checkpoint_every=2)
    run = tmp_path / "r"
    killed = subprocess.run([*CISS, "learn", "--run", str(run), "--classes", "sky,grass,disk", "--config", str(cfg),
                             "--method", "ft"], env=dict(_env(), CISS_TEST_KILL_AT="after-commit"),
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "step-0" / "manifest.json").exists() and (run / ".partial-step-0" / "checkpoint.pt").exists()
    assert not (run / "results.csv").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / f".staging-step-1-{dead.pid}-1").mkdir()  # left by a process that has exited
    alive = run / f".staging-step-1-{os.getpid()}-1"  # a live process's staging folder is its own
    alive.mkdir()

    r = subprocess.run([*CISS, "learn", "--run", str(run), "--config", str(cfg), "--method", "ft", *next_args],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ".partial-step-0" in r.stderr and ".staging-step-1-" in r.stderr and "wrote the reports" in r.stderr
    steps = [0] if "--resume" in next_args else [0, 1]
    assert ("nothing to resume" in r.stderr) == ("--resume" in next_args), r.stderr
    assert RunStore(run).steps() == steps
    rows = (run / "results.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == steps
    assert (run / "results.md").exists() and (run / "forgetting.png").exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [alive.name]
