"""What the machine refuses: a full disk (a file-size limit stands in for it) and a data-loading worker
killed by the system end `ciss learn` and `ciss export` with one line and exit 2, never a traceback or a
hang, and every file that was whole stays whole. Real subprocesses under a real RLIMIT_FSIZE."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import CISS, REPO, write_config

from ciss.export.pipeline import ExportOptions, export_step
from ciss.trainer.learn import learn

resource = pytest.importorskip("resource", reason="file-size limits need the POSIX resource module")
if not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGXFSZ"):
    pytest.skip("this system has no file-size limit (RLIMIT_FSIZE, SIGXFSZ)", allow_module_level=True)

LIMIT = 50_000  # bytes: below a batch in shared memory, a checkpoint, the weights and the ONNX file


def _file_size_limit(limit: int = LIMIT) -> Callable[[], None]:
    def limited() -> None:
        """Runs in the child: writes past `limit` fail with EFBIG (SIGXFSZ ignored, else it kills the process)."""
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limited


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# torch's own logger (lines "W1201 12:00:00.000000 <pid> <file>:<line>] ...") can report, with its
# traceback, a worker's death that its SIGCHLD handler raised inside one of torch's lazy imports; that
# is torch's warning, not ours, and the run still ends with our one line.
_TORCH_LOG = re.compile(r"^[DIWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    ours = "\n".join(ln for ln in r.stderr.splitlines() if not _TORCH_LOG.match(ln))
    assert "Traceback" not in ours, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    return errors[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("limits")
    run = root / "run"
    learn(run, classes=["sky", "grass", "disk"], config_file=write_config(root / "c.toml", size=16),
          method="ft", log=lambda s: None)
    return run


@pytest.mark.parametrize("workers,checkpoint_every", [(0, 2), (0, 1000), (2, 1000)],
                         ids=["checkpoint", "commit", "worker-shared-memory"])
def test_learn_at_the_file_size_limit_is_one_line(tmp_path: Path, base_run: Path, workers: int,
                                                  checkpoint_every: int):
    """The checkpoint, the step's weights, or a worker's batch in shared memory cannot be written."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = _hashes(run)
    cfg = write_config(tmp_path / "c.toml", size=16, epochs=2, checkpoint_every=checkpoint_every)
    cfg.write_text(cfg.read_text().replace("workers = 0", f"workers = {workers}"))
    r = subprocess.run([*CISS, "learn", "--run", str(run), "--new-classes", "box", "--config", str(cfg)],
                       env=_env(), preexec_fn=_file_size_limit(), capture_output=True, text=True, timeout=120)
    assert "File too large" in _one_line_error(r)
    assert {k: v for k, v in _hashes(run).items() if k in before} == before  # whole files stay whole
    assert not (run / "step-1").exists() and not list(run.glob(".staging-*"))


def test_the_train_log_keeps_whole_records_at_the_limit(tmp_path: Path, base_run: Path):
    """An append the limit cuts short is taken back, so the log a resume reads holds whole records."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    cfg = write_config(tmp_path / "c.toml", size=16, epochs=30)
    cfg.write_text(cfg.read_text().replace("log_every = 5", "log_every = 1"))
    r = subprocess.run([*CISS, "learn", "--run", str(run), "--new-classes", "box", "--config", str(cfg)],
                       env=_env(), preexec_fn=_file_size_limit(3000), capture_output=True, text=True, timeout=120)
    error = _one_line_error(r)
    log = (run / ".partial-step-1" / "train_log.jsonl").read_text()
    assert log.endswith("\n") and [json.loads(line)["iteration"] for line in log.splitlines()] == \
        list(range(1, len(log.splitlines()) + 1))
    assert "train_log.jsonl" in error, error


def test_export_at_the_file_size_limit_is_one_line(tmp_path: Path, base_run: Path):
    repo = tmp_path / "models"
    export_step(base_run, repo, "robot", ExportOptions(size=(48, 64)), log=lambda s: None)
    before = _hashes(repo)
    r = subprocess.run([*CISS, "export", "--run", str(base_run), "--repo", str(repo), "--name", "robot",
                        "--size", "48x64"], env=_env(), preexec_fn=_file_size_limit(), capture_output=True, text=True,
                       timeout=300)
    error = _one_line_error(r)
    assert "file-size limit" in error and "model.onnx" in error, error
    assert _hashes(repo) == before


def _forked(pid: str, parent: int) -> bool:
    """A DataLoader worker is forked, so it has its parent's command line; a program the parent runs
    (an import may run ldconfig) has its own."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() == Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_killed_loader_worker_ends_learn_with_one_line(tmp_path: Path, base_run: Path):
    """kill -9 of a DataLoader worker (as the out-of-memory killer would) ends the run, not a traceback."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    # Long epochs: a worker that has handed over all its batches may die unnoticed, so the kill must
    # land early in one; the first workers are the first epoch's.
    cfg = write_config(tmp_path / "c.toml", size=120, epochs=20)
    cfg.write_text(cfg.read_text().replace("workers = 0", "workers = 2"))
    proc = subprocess.Popen([*CISS, "learn", "--run", str(run), "--new-classes", "box", "--config", str(cfg)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        if not children.exists():
            pytest.skip("needs /proc/<pid>/task/<tid>/children to find the worker")
        # A kill that lands just as an epoch's loader shuts down can go unnoticed (its batches were all
        # delivered): keep killing workers until the run ends, so only the outcome is tested.
        deadline, killed = time.time() + 120, 0
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
            try:
                pids = children.read_text().split()
            except FileNotFoundError:  # the run ended between the poll and the read
                break
            worker = next((pid for pid in pids if _forked(pid, proc.pid)), None)
            if worker is not None:
                os.kill(int(worker), signal.SIGKILL)
                killed += 1
                time.sleep(0.5)
        assert killed, "no DataLoader worker started"
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    error = _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert "DataLoader worker" in error and "train.workers" in error, error
    assert not (run / "step-1").exists()
