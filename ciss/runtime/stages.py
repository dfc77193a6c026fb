"""A small stage pipeline: one thread per stage, bounded queues between them, items out in order.

Capture, pre-processing, inference, post-processing and rendering run one after another on one
thread leave the second core of a 2-core robot idle while ONNX Runtime works on the first. OpenCV and
ONNX Runtime release the GIL, so stages on their own threads overlap for real. What the one-thread
loop promised still holds:
* order: each stage is one thread and every queue is FIFO, so items leave in the order `produce`
  made them and every item that went in comes out once (or the run raised, or was closed);
* bounded: queues hold `depth` items, and `in_flight` caps the items between `produce` and the
  consumer, so a slow consumer holds `produce` back (a live source then drops at its own slot);
* stop: once `stop` is set, `produce` is not called again and the items in flight flush through;
* errors: the first exception in any stage stops every stage and is raised in the consumer, after
  an in-order prefix of the items (those still in flight are dropped, as on close()).
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from ciss.errors import CissError

_END = object()  # sent down the queues after the last item
_POLL_S = 0.05   # how often a blocked stage looks whether the run was aborted


class Reservoir:
    """A fixed-size uniform sample of a stream (Vitter's algorithm R) and its exact maximum, so a run
    of any length reports percentiles in constant memory; exact while it has at most `size` values."""

    def __init__(self, size: int = 4096, seed: int = 0):
        self._sample = np.empty(size)
        self._rng = random.Random(seed)
        self.count = 0
        self.max: float | None = None

    def add(self, value: float) -> None:
        if self.count < len(self._sample):
            self._sample[self.count] = value
        elif (j := self._rng.randrange(self.count + 1)) < len(self._sample):
            self._sample[j] = value
        self.count += 1
        self.max = value if self.max is None or value > self.max else self.max

    def percentile(self, q: float) -> float | None:
        n = min(self.count, len(self._sample))
        return float(np.percentile(self._sample[:n], q)) if n else None


Stage = tuple[str, Callable[[Any], Any]]


class Pipeline:
    """`produce()` (None: no more items) and each stage function on its own thread; iterate it for
    the last stage's outputs. `stage_ms` holds each stage's busy time per item (queue waits excluded).
    Use it as a context manager, or iterate it to the end, so its threads are stopped and joined."""

    def __init__(self, produce: Callable[[], Any], stages: Sequence[Stage], *, produce_name: str = "read",
                 depth: int = 2, in_flight: int | None = None, stop: threading.Event | None = None):
        if depth < 1 or (in_flight is not None and in_flight < 1):
            raise ValueError("depth and in_flight must be at least 1")
        self._produce = produce
        self._stages = list(stages)
        self._queues: list[queue.Queue[Any]] = [queue.Queue(depth) for _ in range(len(self._stages) + 1)]
        self._credits = threading.Semaphore(in_flight) if in_flight else None
        self._stop = stop or threading.Event()
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.stage_ms = {name: Reservoir() for name in [produce_name, *(n for n, _ in self._stages)]}
        self._produce_name = produce_name

    # --- the consumer ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self._threads:
            raise CissError("a Pipeline runs once; make a new one")
        self._start()
        try:
            while (item := self._get(self._queues[-1])) is not _END:
                yield item
                if self._credits is not None:
                    self._credits.release()  # the consumer is done with it: one more may be read
        finally:
            self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop every stage (items in flight are dropped) and join the threads; safe to call twice."""
        self._abort.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the threads -------------------------------------------------------------------------------
    def _start(self) -> None:
        targets = [(self._produce_name, self._run_produce, ())]
        targets += [(name, self._run_stage, (name, fn, self._queues[i], self._queues[i + 1]))
                    for i, (name, fn) in enumerate(self._stages)]
        for name, target, args in targets:
            thread = threading.Thread(target=target, args=args, name=f"ciss-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run_produce(self) -> None:
        busy = self.stage_ms[self._produce_name]
        try:
            while not self._stop.is_set() and self._take_credit() and not self._stop.is_set():
                t = time.perf_counter()
                item = self._produce()
                busy.add(1e3 * (time.perf_counter() - t))
                if item is None or not self._put(self._queues[0], item):
                    break
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer
            self._fail(e)
        finally:
            self._put(self._queues[0], _END)

    def _run_stage(self, name: str, fn: Callable[[Any], Any], inbox: queue.Queue[Any],
                   outbox: queue.Queue[Any]) -> None:
        busy = self.stage_ms[name]
        try:
            while (item := self._get(inbox)) is not _END:
                t = time.perf_counter()
                out = fn(item)
                busy.add(1e3 * (time.perf_counter() - t))
                if not self._put(outbox, out):
                    break
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer
            self._fail(e)
        finally:
            self._put(outbox, _END)

    def _take_credit(self) -> bool:
        while self._credits is not None and not self._credits.acquire(timeout=_POLL_S):
            if self._abort.is_set():
                return False
        return not self._abort.is_set()

    def _get(self, inbox: queue.Queue[Any]) -> Any:
        while not self._abort.is_set():
            try:
                return inbox.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        return _END

    def _put(self, outbox: queue.Queue[Any], item: Any) -> bool:
        while not self._abort.is_set():
            try:
                outbox.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _fail(self, error: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = error
        self._abort.set()


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, cgroups cpusets), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadSplit:
    """How the cores are shared: intra-op threads for the backend, threads for OpenCV's own pool."""

    cores: int
    backend: int  # 0: the backend's own default (all cores for ONNX Runtime)
    opencv: int
    chosen: bool  # False when the user gave the backend's share

    def describe(self) -> str:
        backend = "its default" if self.backend == 0 else str(self.backend)
        how = "chosen for" if self.chosen else "given; OpenCV gets the rest of"
        return (f"threads: inference {backend}, OpenCV {self.opencv} ({how} {self.cores} cores; "
                "capture, pre/post-processing, rendering and output overlap on their own threads)")


def thread_split(backend: int | None = None, cores: int | None = None) -> ThreadSplit:
    """Half the cores (at least one) for the backend's intra-op threads, the rest for the other stages.

    Measured on a 2-core EPYC: ONNX Runtime with 2 threads was slower (36.8 ms) than with 1 (32.8 ms)
    while decoding, resizing, rendering and encoding had to wait, so the second core serves those
    stages better. `backend` overrides the backend's share (0: its default)."""
    cores = cores or available_cores()
    if backend is not None and backend < 0:
        raise CissError(f"--threads {backend} is negative; give 0 (the backend's default) or more")
    share = max(1, cores // 2) if backend is None else backend
    return ThreadSplit(cores, share, max(1, cores - (share or cores)), backend is None)
