"""`ciss demo`: the whole loop in one command, from a fresh clone, on a small CPU.

Learn base classes, publish version 1, go live on it, learn new classes while the live loop keeps
serving, publish version 2, and let the runtime swap to it between two frames. The new step and its
export run as `ciss` child processes: they have their own interpreter, so training never holds the
live loop's GIL, and the command lines they print are the ones a user would type. Training gets
`train_threads` torch threads and the live model one ONNX Runtime thread, so on two cores neither
starves the other (two torch threads next to a busy core ran the tiny model ~20x slower here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ciss.errors import CissError
from ciss.manifest import run_steps, write_json_atomic
from ciss.runtime.model import Result
from ciss.runtime.pipeline import LiveOptions, run_live
from ciss.runtime.segmenter import Segmenter
from ciss.runtime.sources import Frame, Source, SyntheticSource, open_source

Log = Callable[[str], None]
MODEL = "demo"
# Everything a demo writes in its folder; --force removes exactly these, nothing else.
OUTPUTS = ("run", "models", "live.mp4", ".live.partial.mp4", "live.jsonl", "forgetting.png", "metrics.json",
           "after-swap.png")
SWAP_WAIT_S = 60.0     # after version 2 is published, how long the runtime may take to serve it
PROGRESS_EVERY_S = 20.0


@dataclass(frozen=True)
class Preset:
    """What a demo learns, how, and how long it takes: chosen by the data set."""

    classes: tuple[str, ...]
    new_classes: tuple[str, ...]
    config: dict[str, Any]  # overrides of configs/defaults.toml, saved in the run like any --config
    duration: str           # printed at the start: the expected wall time on two CPU cores
    train_threads: int      # torch threads of both training steps
    fps: float              # live frames per second: enough to watch, little enough to leave training a core
    method_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)  # `ciss learn` flags of the new step


SYNTHETIC = Preset(
    classes=("sky", "grass", "water", "sand", "disk", "box"),
    new_classes=("triangle", "ring"),
    # The tiny model learns from scratch, so lr is higher than the ImageNet-initialised defaults;
    # gradients are clipped as in benchmarks/configs/camvid_mobile.toml (GSC with Local POD at this
    # lr unclipped took the base classes from 69 to 16 mIoU).
    config={"model": {"preset": "tiny"},
            "train": {"epochs": 30, "lr": 0.05, "epochs_next": 15, "lr_next": 0.05, "clip_grad_norm": 3.0,
                      "log_every": 60}},
    duration="about 3 minutes", train_threads=1, fps=10.0,
    # On the tiny model GSC's full preset learns no new class (0.0 IoU for both). Local POD, the
    # inter-class relation term and the adaptive CE factor are what hold it; with the three off it
    # learned triangle 27 and ring 5 IoU while the base classes rose from 69 to 72 mIoU, above MiB
    # on all classes (docs/results/gsc-synthetic/, benchmarks/gsc_plasticity.sh).
    method_flags={"gsc": ("--no", "gsc.pod", "--no", "gsc.relation", "--no", "gsc.adaptive_factor")})

# camvid:6-1's base step, then two classes that a road video shows a lot of; the schedule is
# benchmarks/configs/camvid_mobile.toml with a longer, faster second step so the new classes show.
CAMVID = Preset(
    classes=("sky", "building", "pole", "road", "sidewalk", "tree"),
    new_classes=("car", "pedestrian"),
    config={"model": {"preset": "mobilenet_v3_large"},
            "train": {"batch_size": 8, "crop": 112, "epochs": 16, "lr": 0.05, "epochs_next": 6, "lr_next": 0.01,
                      "workers": 1, "clip_grad_norm": 3.0, "log_every": 40}},
    duration="about 15 minutes", train_threads=1, fps=5.0)


def _folder_preset(learnable: Sequence[str]) -> Preset:
    """CamVid's preset for CamVid; other folder data sets get its schedule on their own first classes."""
    if set(CAMVID.classes + CAMVID.new_classes) <= set(learnable):
        return CAMVID
    k = min(6, max(1, len(learnable) - 2))
    return Preset(tuple(learnable[:k]), tuple(learnable[k:k + 2]), CAMVID.config,
                  "20 minutes or more, growing with the data set", CAMVID.train_threads, CAMVID.fps,
                  CAMVID.method_flags)


def _check_classes(classes: Sequence[str], new: Sequence[str], learnable: Sequence[str], dataset: str) -> None:
    """Every mistake in the class lists, before minutes of training find it."""
    if not classes or not new:
        raise CissError(f"the demo needs base classes and new classes; {dataset} has: {', '.join(learnable)}")
    unknown = [n for n in (*classes, *new) if n not in learnable]
    if unknown:
        raise CissError(f"unknown class {', '.join(map(repr, unknown))}; {dataset} has: {', '.join(learnable)}")
    both = sorted(set(classes) & set(new))
    if both:
        raise CissError(f"{', '.join(both)} cannot be both a base class and a new class")


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CissError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise CissError(f"{out} is not empty; give another --out, or --force to replace an earlier demo's "
                            "files there")
        for name in OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _live_spec(data: Path | None, video: str | None, eval_split: str) -> str:
    if video is not None:
        return video
    if data is None:
        return "synthetic"
    images = data / "images" / eval_split
    if not images.is_dir():
        raise CissError(f"{data} has no images/{eval_split} to play live; give a video with --video")
    return str(images)


def _open_live(spec: str, fps: float) -> Source:
    if spec == "synthetic":
        return SyntheticSource(fps=fps)  # 320x240: big enough for the legend, cheap to render and segment
    return open_source(spec, loop=True, fps=fps, log=print)


class _Stoppable(Source):
    """Ends the wrapped source on request."""

    def __init__(self, inner: Source):
        super().__init__(inner.name)
        self.inner, self.live, self.fps = inner, inner.live, inner.fps
        self.stop = threading.Event()

    def read(self) -> Frame | None:
        return None if self.stop.is_set() else self.inner.read()

    def close(self) -> None:
        self.inner.close()

    @property
    def stats(self) -> dict[str, int]:
        return self.inner.stats

    def describe(self) -> str:
        return self.inner.describe()


class _Learner(threading.Thread):
    """Runs `ciss` commands one after the other in child processes, their output prefixed in the log."""

    def __init__(self, commands: list[tuple[str, str, list[str]]], threads: int, log: Log):
        super().__init__(name="demo learner", daemon=True)
        self.commands, self.log = commands, log
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        self.error: str | None = None
        self.finished_at: float | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        for header, label, args in self.commands:
            if self._stopping.is_set():
                return
            self.log(header)
            self.log(f"[{label}] ciss {' '.join(args)}")
            proc = self._proc = subprocess.Popen([sys.executable, "-m", "ciss.apps.cli", *args], env=self.env,
                                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            last = ""
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip():
                    last = line.strip().removeprefix("error: ")
                    self.log(f"[{label}] {line.strip()}")
            if proc.wait() != 0:
                if not self._stopping.is_set():
                    self.error = f"`ciss {args[0]}` failed (exit {proc.returncode}): {last}"
                return
        self.finished_at = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        self.join(timeout=30)


class _Monitor:
    """A sink of the live loop: checks frame order, says how it goes, keeps the best frame after the
    swap, and ends the loop once version 2 has served `after_swap` frames (or when learning failed).

    How it goes: on a terminal, a tqdm counter of the frames served with the version and the drops
    (`progress`, closed by the caller); off one, where the bar is silent, a log line every
    PROGRESS_EVERY_S. It reads each result's own frame index from the stats record: with the stages
    overlapped, the source has already read the next frames when a result comes out."""

    def __init__(self, source: _Stoppable, learner: _Learner, first_version: int, after_swap: int, log: Log,
                 progress: Any = None):
        self.source, self.learner, self.first_version = source, learner, first_version
        self.after_swap, self.log, self.progress = after_swap, log, progress
        self.expected_seq = 0
        self.out_of_order = 0
        self.swap_seq: int | None = None
        self.error: str | None = None
        self.picture: np.ndarray | None = None
        self._best = -1
        self._next_note = time.monotonic() + PROGRESS_EVERY_S

    def refuse(self, error: Exception) -> None:
        """on_error of the Segmenter: a published version that failed its checks."""
        self.log(f"[live] version refused: {error}")
        self.error = f"the runtime refused the new version: {error}"

    def write(self, result: Result, overlay: np.ndarray | None, record: dict[str, Any]) -> None:
        now = time.monotonic()
        if result.seq != self.expected_seq or record["frame"] != result.seq:
            self.out_of_order += 1
        self.expected_seq = result.seq + 1
        if self.swap_seq is None and result.version != self.first_version:
            self.swap_seq = result.seq
        if self.swap_seq is not None and overlay is not None:
            self._keep_best(overlay, result)
        if self.progress is not None and not self.progress.disable:
            self.progress.set_postfix_str(f"version {result.version}, dropped {self.source.stats.get('dropped', 0)}",
                                          refresh=False)
            self.progress.update(1)
        elif now >= self._next_note:
            self._next_note = now + PROGRESS_EVERY_S
            self.log(f"[live] frame {result.seq}: version {result.version}, "
                     f"dropped {self.source.stats.get('dropped', 0)}")
        self._maybe_stop(result, now)

    def _keep_best(self, overlay: np.ndarray, result: Result) -> None:
        """The frame after the swap where the new classes cover the most pixels: the one worth showing."""
        score = int(np.isin(result.mask, result.new_classes).sum())
        if score > self._best:
            self._best = score
            self.picture = overlay.copy()

    def _maybe_stop(self, result: Result, now: float) -> None:
        if self.swap_seq is not None and result.seq - self.swap_seq + 1 >= self.after_swap:
            self.source.stop.set()
        elif self.error is None and self.learner.error is not None:
            self.error = self.learner.error
        elif (self.swap_seq is None and self.learner.finished_at is not None
              and now - self.learner.finished_at > SWAP_WAIT_S):
            self.error = f"version 2 was published but not served within {SWAP_WAIT_S:g} s"
        if self.error is not None:
            self.source.stop.set()


def run_demo(out: Path, data: Path | None = None, video: str | None = None, method: str = "gsc",
             classes: Sequence[str] | None = None, new_classes: Sequence[str] | None = None,
             overrides: dict[str, Any] | None = None, fps: float | None = None, after_swap_s: float = 8.0,
             display: bool = False, force: bool = False, log: Log = print) -> dict[str, Any]:
    """Learn, publish, serve, learn more while serving, swap; returns what metrics.json holds.

    `overrides` change the preset's training config (tests shorten the schedule with it); `fps` paces
    the live source (default: the preset's); the loop ends `after_swap_s` seconds after the swap.
    """
    from ciss.trainer.config import TRAINING
    from ciss.trainer.data import open_dataset
    from ciss.trainer.log import bar
    from ciss.trainer.methods import build_method

    started = time.monotonic()
    out = Path(out)
    if data is not None and not data.is_dir():
        raise CissError(f"no dataset folder at {data}; give a folder with classes.json, images/ and labels/")
    info = open_dataset("folder" if data else None, data, TRAINING.default("data.train_split")).info
    preset = _folder_preset(info.learnable) if data else SYNTHETIC
    # The preset is the demo's config file; `overrides` are as the command line's.
    config = TRAINING.resolve(preset.config, overrides, under={"data": {"root": str(data.resolve())}} if data else None)
    classes = list(classes or preset.classes)
    new_classes = list(new_classes or preset.new_classes)
    _check_classes(classes, new_classes, info.learnable, info.name)
    build_method(method, {})
    fps = fps or preset.fps
    spec = _live_spec(data, video, config["data"]["eval_split"])
    _open_live(spec, fps).close()  # an unreadable video fails now, not after the training
    _prepare_out(out, force)

    run, repo = out / "run", out / "models"
    log(f"ciss demo on {info.name}: learn {', '.join(classes)}; go live; learn {', '.join(new_classes)} "
        f"with {method} while serving; hot-swap. Expected: {preset.duration} on two CPU cores. Output: {out}")
    stages: dict[str, float] = {}

    t = time.monotonic()
    log(f"[1/5] learning the base classes {', '.join(classes)} (step 0, {config['model']['preset']} model)")
    _learn_base(run, data, classes, method, config, preset.train_threads, log)
    stages["learn_base_s"] = time.monotonic() - t

    t = time.monotonic()
    log("[2/5] publishing version 1")
    from ciss.export.pipeline import ExportOptions, export_step
    export_step(run, repo, MODEL, ExportOptions(), log=log)
    stages["publish_v1_s"] = time.monotonic() - t

    t = time.monotonic()
    log = _above(log)  # the live bar is redrawn under each line the learner and the live loop print
    live_log: Log = lambda s: log(s if s.startswith("[live]") else f"[live] {s}")
    learner = _Learner([
        (f"[4/5] learning the new classes {', '.join(new_classes)} with {method} (step 1) while live", "learn",
         ["learn", "--run", str(run), "--new-classes", ",".join(new_classes), "--method", method,
          *preset.method_flags.get(method, ())]),
        ("[5/5] publishing version 2; the runtime swaps to it between two frames", "export",
         ["export", "--run", str(run), "--repo", str(repo), "--name", MODEL]),
    ], preset.train_threads, log)
    log(f"[3/5] going live on version 1{'' if display else ' (headless)'}, writing {out / 'live.mp4'}")
    segmenter = Segmenter.from_repository(repo, MODEL, threads=1, log=live_log,
                                          on_error=lambda e: monitor.refuse(e))
    with segmenter, _Stoppable(_open_live(spec, fps)) as source:
        progress = bar(None, "[live] serving", unit=" frames")  # no total: a counter of the frames served
        monitor = _Monitor(source, learner, segmenter.version, max(1, round(after_swap_s * fps)), log, progress)
        live_log(f"source: {source.describe()}")
        learner.start()
        try:
            report = run_live(source, segmenter, LiveOptions(display=display, save=out / "live.mp4",
                                                             stats=out / "live.jsonl"), log=live_log,
                              sinks=[monitor])
        finally:
            learner.stop()
            progress.close()
    stages["live_s"] = time.monotonic() - t
    if monitor.error:
        raise CissError(monitor.error)
    if monitor.swap_seq is None:
        raise CissError("the live loop ended before version 2 was served")

    if monitor.picture is not None:
        cv2.imwrite(str(out / "after-swap.png"), monitor.picture)
    shutil.copyfile(run / "forgetting.png", out / "forgetting.png")
    metrics = _metrics(run, report, monitor, stages, time.monotonic() - started,
                       {"data": str(data) if data else "synthetic", "live_source": spec, "method": method,
                        "classes": classes, "new_classes": new_classes, "out": str(out)})
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _above(log: Log) -> Log:
    """`log`, clearing tqdm's bars for the line and redrawing them after it (a no-op off a terminal)."""
    from tqdm import tqdm

    def write(line: str) -> None:
        with tqdm.external_write_mode():
            log(line)
    return write


def _learn_base(run: Path, data: Path | None, classes: list[str], method: str, config: dict[str, Any],
                threads: int, log: Log) -> None:
    import torch

    from ciss.trainer.learn import learn

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_config = {k: v for k, v in config.items() if k != "method"}  # carried to the step learned live
        learn(run, data=data, classes=classes, method=method, config_file=run_config, log=log)
    finally:
        torch.set_num_threads(before)


def _metrics(run: Path, report: dict[str, Any], monitor: _Monitor, stages: dict[str, float], wall_s: float,
             demo: dict[str, Any]) -> dict[str, Any]:
    """Per-class IoU before and after the new step, forgetting, and the live report."""
    history = run_steps(run)
    steps = [{"step": m.step, "added": m.added, "method": m.method, "model": m.preset, "train_s": m.wall_s,
              "metrics": m.metrics} for m in history]
    first, last = history[0].metrics, history[-1].metrics
    before, after = first["per_class"], last["per_class"]
    drop = {n: before[n] - after[n] for n in history[0].classes.names if n in before and n in after}
    forgetting = {"per_class": drop, "mean": sum(drop.values()) / len(drop) if drop else None,
                  "miou_old_before": first["miou_old"], "miou_old_after": last["miou_old"],
                  "miou_new_after": last["miou_new"]}
    live = {**report, "out_of_order": monitor.out_of_order, "swap_seq": monitor.swap_seq,
            "seq_continuous": monitor.out_of_order == 0}
    return {"demo": {**demo, "wall_s": wall_s, "stages_s": stages}, "steps": steps, "forgetting": forgetting,
            "live": live}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def describe_demo(metrics: dict[str, Any]) -> str:
    """The closing report: IoU per class before and after, forgetting, and how the live run went."""
    before, after = metrics["steps"][0], metrics["steps"][-1]
    f, live, demo = metrics["forgetting"], metrics["live"], metrics["demo"]
    names = list(dict.fromkeys([*before["metrics"]["per_class"], *after["metrics"]["per_class"]]))
    width = max(len(n) for n in [*names, "class"]) + 2
    lines = [(f"IoU (%) on the {after['metrics'].get('split', 'eval')} split, "
              f"before and after learning {', '.join(after['added'])} with {after['method']}"),
             f"  {'class':<{width}}{'before':>8}{'after':>8}{'change':>8}"]
    for n in names:
        b, a = before["metrics"]["per_class"].get(n), after["metrics"]["per_class"].get(n)
        change = "new" if b is None else f"{100 * (a - b):+.1f}" if a is not None else "-"
        lines.append(f"  {n:<{width}}{_pct(b):>8}{_pct(a):>8}{change:>8}")
    mean = f["mean"]
    forgot = ("-" if mean is None else f"{100 * mean:.1f} points per class" if mean >= 0
              else f"none: {-100 * mean:.1f} points per class gained")
    lines.append(f"mIoU of the base classes {_pct(f['miou_old_before'])} -> {_pct(f['miou_old_after'])} "
                 f"(forgetting {forgot}); new classes {_pct(f['miou_new_after'])}")
    lines.append(f"live: {live['frames']} frames in {live['wall_s']:.1f} s ({live['fps'] or 0:.1f} FPS) on "
                 f"{live['backend']}; dropped {live['dropped']}; frame order "
                 f"{'continuous' if live['seq_continuous'] else 'BROKEN'}")
    gap = live["frame_gap_ms"]
    for s in live["swaps"]:
        lines.append(f"swap v{s['previous']} -> v{s['version']} at frame {s['first_frame']}: load {s['load_s']:.2f} s "
                     f"and warm-up {s['warmup_s']:.2f} s off the frame path, {s['swap_ms']:.2f} ms on it; "
                     f"longest frame gap around it {s['max_gap_ms']:.0f} ms (median gap {gap['p50']:.0f} ms)")
    out = Path(demo["out"])
    files = [out / n for n in ("live.mp4", "after-swap.png", "forgetting.png", "metrics.json")]
    lines.append(f"files: {', '.join(str(p) for p in files if p.exists())}")
    lines.append(f"done in {demo['wall_s'] / 60:.1f} min")
    return "\n".join(lines)
