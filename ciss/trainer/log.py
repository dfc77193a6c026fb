"""Training logs (JSONL, CSV and TensorBoard when it is installed) and the progress line."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def format_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
    """The progress line: rewritten in place on a terminal, a new line each call otherwise.

    The engine calls it at its logging interval, so a log file gets one line per interval."""

    def __init__(self, total: int, label: str, stream: TextIO = sys.stderr, start: int = 0):
        self.total, self.label, self.stream = total, label, stream
        self.tty = stream.isatty()
        self.start_it, self.t0 = start, time.perf_counter()

    def update(self, it: int, terms: dict[str, float], lr: float) -> None:
        done = it - self.start_it
        rate = (time.perf_counter() - self.t0) / max(done, 1)
        eta = format_seconds(rate * (self.total - it))
        width = 20
        bar = "#" * int(width * it / self.total) + "." * (width - int(width * it / self.total))
        loss = sum(terms.values())
        parts = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        line = f"{self.label} [{bar}] {it}/{self.total} loss {loss:.4f} ({parts}) lr {lr:.2e} eta {eta}"
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(120))
            if it == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.write(text + "\n")
        self.stream.flush()


class TrainLog:
    """Appends one record per logged iteration; survives resume (files are appended to)."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder, self.enabled = folder, enabled
        self.tb = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: only when tensorboard is installed
            self.tb = SummaryWriter(str(folder / "tensorboard"))
        except Exception:
            self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.folder / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        path = self.folder / "train_log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(list(record))
            writer.writerow([record[k] for k in record])
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(k, v, record["iteration"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
