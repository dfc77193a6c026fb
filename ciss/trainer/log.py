"""Training logs (JSONL, CSV and TensorBoard when it is installed) and the progress bars."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ciss.manifest import write_bytes_atomic


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def bar(total: int | None, label: str, start: int = 0, enabled: bool = True, unit: str = "it") -> tqdm:
    """A tqdm progress bar on stderr: redrawn in place with a smoothed ETA on a terminal, silent when
    stderr is not one (logs keep the train log's records instead), and off where `enabled` is False
    (every torchrun process but the first). Training, evaluation, export calibration and the demo use it;
    without a `total` it counts (the demo's live frames)."""
    return tqdm(total=total, initial=start, desc=label, unit=unit, disable=None if enabled else True,
                dynamic_ncols=True, file=sys.stderr)


class Progress:
    """The training bar: iterations, the loss terms and the learning rate at each logging interval."""

    def __init__(self, total: int, label: str, start: int = 0, enabled: bool = True):
        self.bar = bar(total, label, start, enabled)

    def update(self, it: int, terms: dict[str, float], lr: float) -> None:
        parts = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        self.bar.set_postfix_str(f"loss {sum(terms.values()):.4f} ({parts}) lr {lr:.2e}", refresh=False)
        self.bar.update(it - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _append(path: Path, text: str) -> None:
    """Append whole lines or nothing: a full disk must not leave half a record in a whole log."""
    with open(path, "ab", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        data = memoryview(text.encode())
        try:
            while data:
                data = data[f.write(data):]
        except OSError as e:
            f.truncate(size)
            raise OSError(e.errno, e.strerror, str(path)) from e


class TrainLog:
    """Appends one record per logged iteration; survives resume (files are appended to).

    A step resumed at iteration `start` repeats the iterations after its checkpoint, so records
    after `start` are dropped first, and with them a last line cut short by a kill or a full disk."""

    def __init__(self, folder: Path, enabled: bool = True, start: int = 0, warn: Callable[[str], None] = print):
        self.folder, self.enabled = folder, enabled
        self.tb: TensorBoard | None = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._truncate(start)
        self.tb = TensorBoard.open(folder / "tensorboard", start, warn)

    def _truncate(self, start: int) -> None:
        jsonl, table = self.folder / "train_log.jsonl", self.folder / "train_log.csv"
        if jsonl.exists():
            kept = []
            for line in jsonl.read_text().splitlines():
                try:
                    if json.loads(line)["iteration"] > start:
                        break
                except json.JSONDecodeError:
                    break
                kept.append(line + "\n")
            write_bytes_atomic(jsonl, "".join(kept).encode())
        if table.exists():
            rows = list(csv.reader(io.StringIO(table.read_text())))
            kept_rows = rows[:1]
            for row in rows[1:]:
                if len(row) != len(rows[0]) or not row[0].isdigit() or int(row[0]) > start:
                    break
                kept_rows.append(row)
            if len(kept_rows) == 1:  # no record left, maybe a torn header: write() starts the file again
                table.unlink()
                return
            buf = io.StringIO()
            csv.writer(buf).writerows(kept_rows)
            write_bytes_atomic(table, buf.getvalue().encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        _append(self.folder / "train_log.jsonl", json.dumps(record) + "\n")
        path = self.folder / "train_log.csv"
        buf = io.StringIO()
        writer = csv.writer(buf)
        if not path.exists():
            writer.writerow(list(record))
        writer.writerow([record[k] for k in record])
        _append(path, buf.getvalue())
        if self.tb is not None:
            self.tb.write(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class TensorBoard:
    """The train log mirrored to TensorBoard, when tensorboard is installed: best effort.

    tensorboard writes its event files on a thread of its own. A failure there (a full disk, a file-size
    limit) would print that thread's traceback and be raised again at the next call, ending the step for
    a view of what train_log.jsonl already holds. Instead the mirror stops, says so in one warning line,
    and training goes on; the error that ends a step comes from the train log's own files.
    """

    def __init__(self, writer: Any, warn: Callable[[str], None]):
        self.writer, self.warn = writer, warn
        self.failed: BaseException | None = None
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_failed

    @classmethod
    def open(cls, folder: Path, start: int, warn: Callable[[str], None]) -> TensorBoard | None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: only when tensorboard is installed
        except ImportError:
            return None
        try:
            return cls(SummaryWriter(str(folder), purge_step=start or None), warn)
        except Exception as e:  # noqa: BLE001 - tensorboard's own errors; the train log is what counts
            warn(f"warning: no TensorBoard log ({e}); train_log.jsonl and .csv hold every record")
            return None

    def _thread_failed(self, args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__module__.startswith("tensorboard."):
            self.failed = self.failed or args.exc_value
        else:
            self._previous_hook(args)

    def write(self, record: dict[str, Any]) -> None:
        if self.failed is None:
            try:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "iteration":
                        self.writer.add_scalar(k, v, record["iteration"])
            except Exception as e:  # noqa: BLE001 - the writer re-raises its thread's error here
                self.failed = e
        if self.failed is not None:
            self.close()

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()  # flushes and joins the writer's thread
        except Exception as e:  # noqa: BLE001 - its thread's error, raised again
            self.failed = self.failed or e
        self.writer = None
        threading.excepthook = self._previous_hook
        if self.failed is not None:
            self.warn(f"warning: TensorBoard stopped logging ({self.failed}); train_log.jsonl and .csv hold "
                      "every record")
