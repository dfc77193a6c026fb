"""Every user error: one line on stderr, exit code 2, and the run folder exactly as it was."""

from __future__ import annotations

import errno
import gc
import hashlib
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from ciss.apps.cli import main
from ciss.errors import environment_error, hide_abandoned_thread_starts
from conftest import CISS, REPO, make_folder_dataset, write_config


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_user_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    err = lines[-1]  # progress may come before it; the error is one line, last, and no traceback
    assert err.startswith("error: ") and sum(ln.startswith("error:") for ln in lines) == 1, lines
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in err, err


@pytest.fixture
def base_run(tmp_path: Path, folder_dataset: Path):
    cfg = write_config(tmp_path / "c.toml", synthetic=False)
    run = tmp_path / "run"
    r = invoke("learn", "--run", str(run), "--data", str(folder_dataset), "--classes", "a,b",
               "--config", str(cfg), "--method", "ft")
    assert r.exit_code == 0, r.output
    return run, cfg, folder_dataset


def test_missing_data_path(tmp_path: Path):
    run = tmp_path / "r"
    cfg = write_config(tmp_path / "c.toml", synthetic=False)
    assert_user_error(invoke("learn", "--run", str(run), "--data", str(tmp_path / "nope"), "--classes", "a",
                             "--config", str(cfg)), "nope")
    assert not run.exists()


@pytest.mark.parametrize("flag,value,fragment", [
    ("--new-classes", "zebra", "zebra"),
    ("--new-classes", "c,c", "more than once"),
    ("--new-classes", "b", "already has class b"),
])
def test_bad_new_classes(base_run, flag, value, fragment):
    run, cfg, data = base_run
    before = snapshot(run)
    assert_user_error(invoke("learn", "--run", str(run), flag, value, "--config", str(cfg)), fragment)
    assert snapshot(run) == before


def test_other_model(base_run):
    run, cfg, _ = base_run
    before = snapshot(run)
    assert_user_error(invoke("learn", "--run", str(run), "--new-classes", "c", "--config", str(cfg),
                             "--model", "mobilenet_v3_large"), "tiny")
    assert snapshot(run) == before


def test_classes_on_existing_run(base_run):
    run, cfg, _ = base_run
    before = snapshot(run)
    assert_user_error(invoke("learn", "--run", str(run), "--classes", "c", "--config", str(cfg)), "--new-classes")
    assert snapshot(run) == before


def _break(data: Path, how: str) -> None:
    img, lbl = data / "images" / "train" / "im1.png", data / "labels" / "train" / "im1.png"
    if how == "label_value":
        label = cv2.imread(str(lbl), cv2.IMREAD_UNCHANGED)
        label[0, 0] = 7
        cv2.imwrite(str(lbl), label)
    elif how == "size":
        cv2.imwrite(str(img), np.zeros((10, 10, 3), np.uint8))
    elif how == "corrupt":
        img.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


@pytest.mark.parametrize("how,fragment", [("label_value", "7"), ("size", "size"), ("corrupt", "im1")])
def test_bad_data_leaves_run_untouched(base_run, how, fragment):
    run, cfg, data = base_run
    _break(data, how)
    before = snapshot(run)
    assert_user_error(invoke("learn", "--run", str(run), "--new-classes", "c", "--config", str(cfg)), fragment)
    assert snapshot(run) == before


def test_error_from_loader_worker_is_one_line(tmp_path: Path):
    """With worker processes the error crosses a process boundary; still one line, exit 2."""
    data = make_folder_dataset(tmp_path / "d")
    _break(data, "corrupt")
    cfg = write_config(tmp_path / "c.toml", synthetic=False)
    cfg.write_text(cfg.read_text().replace("workers = 0", "workers = 2").replace("batch_size = 4", "batch_size = 6"))
    r = subprocess.run([*CISS, "learn", "--run", str(tmp_path / "r"), "--data", str(data), "--classes", "a,b,c",
                        "--config", str(cfg)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "im1" in lines[0], r.stderr
    assert not (tmp_path / "r").exists()


def test_a_failed_call_releases_its_loader_workers_before_exiting(tmp_path: Path):
    """The error's traceback holds the DataLoader iterator and its worker processes; the CLI exits
    outside its handler so they are shut down at once, not left to the interpreter's exit, whose
    multiprocessing hook joins them without a time limit. The collector stays off during the call, so
    that a collection the interpreter happens to run cannot hide workers the CLI left alive."""
    data = make_folder_dataset(tmp_path / "d")
    _break(data, "corrupt")
    cfg = write_config(tmp_path / "c.toml", synthetic=False)
    cfg.write_text(cfg.read_text().replace("workers = 0", "workers = 2").replace("batch_size = 4", "batch_size = 6"))
    gc.disable()
    try:
        result = invoke("learn", "--run", str(tmp_path / "r"), "--data", str(data), "--classes", "a,b,c",
                        "--config", str(cfg))
        alive = multiprocessing.active_children()
    finally:
        gc.enable()
    assert_user_error(result, "im1")
    assert alive == [], alive


def test_eval_and_runs(base_run):
    run, _, _ = base_run
    r = invoke("eval", "--run", str(run))
    assert r.exit_code == 0, r.output
    assert "mIoU old" in r.output and "a" in r.output
    r = invoke("runs", str(run.parent))
    assert r.exit_code == 0 and "step 0" in r.output
    assert_user_error(invoke("eval", "--run", str(run), "--step", "5"), "no step 5")
    assert_user_error(invoke("runs", str(run / "nope")), "not a folder")


def test_corrupt_weights(base_run):
    run, cfg, _ = base_run
    (run / "step-0" / "model.pt").write_bytes(b"truncated")
    assert_user_error(invoke("eval", "--run", str(run)), "corrupt")


def test_divergence_is_one_line_and_leaves_run_untouched(base_run):
    run, cfg, _ = base_run
    text = cfg.read_text().replace("epochs_next = 1\n", "epochs_next = 3\nlr_next = 1e30\n")
    cfg.write_text(text)
    before = snapshot(run)
    assert_user_error(invoke("learn", "--run", str(run), "--new-classes", "c", "--config", str(cfg)),
                      "diverged", "clip_grad_norm")
    assert snapshot(run) == before


def test_truncated_jpeg_is_one_line_and_nothing_is_committed(tmp_path: Path):
    """libjpeg decodes a cut-off JPEG into grey with only a warning; learn must name the file and stop."""
    data = make_folder_dataset(tmp_path / "d")
    png = data / "images" / "train" / "im1.png"
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(png)))
    png.unlink()
    bad = data / "images" / "train" / "im1.jpg"
    bad.write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    cfg = write_config(tmp_path / "c.toml", synthetic=False)
    cfg.write_text(cfg.read_text().replace("batch_size = 4", "batch_size = 6"))  # every image is read
    r = subprocess.run([*CISS, "learn", "--run", str(tmp_path / "r"), "--data", str(data), "--classes", "a,b,c",
                        "--config", str(cfg)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: image {bad} is truncated (its JPEG data ends before the " \
                                                "end-of-image marker); replace or remove it", r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "r").exists()


def test_resume_without_a_checkpoint_says_so(tmp_path: Path, base_run):
    """A mistyped --run with --resume must not quietly start a new run from scratch."""
    run, cfg, data = base_run
    other = tmp_path / "rnu"
    assert_user_error(invoke("learn", "--run", str(other), "--data", str(data), "--classes", "a,b",
                             "--config", str(cfg), "--resume"), "no checkpoint of step 0", "drop --resume", "--run")
    assert not other.exists()
    before = snapshot(run)
    assert_user_error(invoke("learn", "--run", str(run), "--new-classes", "c", "--config", str(cfg), "--resume"),
                      "no checkpoint of step 1")
    assert snapshot(run) == before


def _raised_while_handling(first: BaseException, then: BaseException) -> BaseException:
    try:
        try:
            raise first
        except type(first):
            raise then
    except type(then) as e:
        return e


def test_machine_limits_are_found_behind_the_error_they_caused():
    """A worker's death reported inside `Thread.start` reached the CLI as threading's KeyError, with the
    RuntimeError as its context (CI, under load): still the one line that says what to do."""
    died = RuntimeError("DataLoader worker (pid 2184) is killed by signal: Killed. ")
    error = environment_error(_raised_while_handling(died, KeyError("<Thread(QueueFeederThread)>")), "learn")
    assert error is not None and str(error).startswith("DataLoader worker (pid 2184) is killed by signal: Killed;")
    assert "train.workers" in str(error) and "--resume" in str(error)
    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/x")
    assert "the disk is full" in str(environment_error(_raised_while_handling(full, ValueError("cleanup")), "export"))
    assert environment_error(_raised_while_handling(ValueError("a"), KeyError("b"))) is None
    assert environment_error(KeyError("b")) is None


# A thread start interrupted the way PyTorch's SIGCHLD handler interrupts it when a worker dies:
# the signal lands inside `Thread.start`, which forgets the thread it was starting; that thread then
# fails in threading's bookkeeping (KeyError) and Python reports it as "Exception ignored in thread".
ABANDONED_START = '''
import os, signal, sys, threading, time

def died(*_):
    raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed. ")

def start_abandoned_thread():
    signal.signal(signal.SIGUSR1, died)
    real = threading._start_new_thread
    def start_then_signal(*args):
        ident = real(*args)
        os.kill(os.getpid(), signal.SIGUSR1)
        return ident
    threading._start_new_thread = start_then_signal

    class LateStart(threading.Event):
        def set(self):
            time.sleep(0.3)  # start() has given the thread up by then
            super().set()

    thread = threading.Thread(target=lambda: None)
    thread._started = LateStart()
    try:
        thread.start()
    finally:
        time.sleep(1)  # the abandoned thread reports before the process ends

if sys.argv[1] == "cli":
    from ciss.apps.cli import main
    main.command("start-a-thread")(start_abandoned_thread)
    main(["start-a-thread"])
else:
    try:
        start_abandoned_thread()
    except RuntimeError:
        sys.exit(2)
'''


@pytest.mark.parametrize("through", ["cli", "plain"])
def test_a_thread_abandoned_by_a_worker_death_prints_nothing_after_the_error(tmp_path: Path, through: str):
    script = tmp_path / "abandoned.py"
    script.write_text(ABANDONED_START)
    done = subprocess.run([CISS[0], str(script), through], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2, done.stderr
    if through == "plain":  # the scenario is real: without the CLI, Python prints the thread's traceback
        assert "Exception ignored in thread started by" in done.stderr and "KeyError" in done.stderr
        return
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DataLoader worker (pid 1) is killed by signal: Killed;"), lines


def test_the_thread_report_filter_is_installed_once_and_passes_other_reports_on(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    for _ in range(3):  # every in-process CLI call installs it: one layer, not one per call
        hide_abandoned_thread_starts()
    hook = sys.unraisablehook
    assert not getattr(hook.__closure__[0].cell_contents, "hides_abandoned_thread_starts", False)
    hook(SimpleNamespace(exc_value=KeyError(threading.Thread())))
    other = SimpleNamespace(exc_value=KeyError("a key"))
    hook(other)
    assert seen == [other]
