"""The one exception type for mistakes a user can make (paths, names, corrupt files, hardware).

The CLI prints its message as a single line on stderr and exits with code 2; anything else that
escapes is a bug and keeps its traceback, except the machine's own limits (`environment_error`).
"""

import errno
import sys
import threading
from collections.abc import Iterator
from typing import Any

_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
         errno.EFBIG: "the file-size limit is reached"}


class CissError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""


def environment_error(e: BaseException, command: str | None = None) -> CissError | None:
    """A user-facing error for what the machine refused (a full disk, a file-size limit, a data-loading
    worker killed by the system), or None for anything else. Files written atomically stay whole, and
    `ciss learn` keeps a step's last checkpoint, so the message says how to go on."""
    again = "run it again with --resume" if command == "learn" else "run the command again"
    for cause in _chain(e):
        if isinstance(cause, OSError) and cause.errno in _FULL:
            where = f"writing {cause.filename}" if cause.filename else "writing a file"
            return CissError(f"{_FULL[cause.errno]} ({where}: {cause.strerror}); free some space or raise the "
                             f"limit, then {again}")
        if isinstance(cause, RuntimeError) and str(cause).startswith("DataLoader worker ("):
            return CissError(f"{str(cause).splitlines()[0].rstrip('. ')}; if the system ran out of memory, set "
                             f"train.workers lower (0: no worker processes), then {again}")
    return None


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised while handling. PyTorch reports a killed worker from a
    SIGCHLD handler, in whatever the main process was doing: inside `Thread.start` the RuntimeError
    then surfaces as a KeyError from threading's bookkeeping, with the RuntimeError as its context."""
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def hide_abandoned_thread_starts() -> None:
    """When `_chain`'s case happens, the thread that `Thread.start` was starting is abandoned half
    registered and fails in threading's own bookkeeping too: a KeyError naming that Thread, which
    Python prints as "Exception ignored in thread started by" after the one-line error. Drop exactly
    that report; every other unraisable exception goes to the hook installed before."""
    previous = sys.unraisablehook
    if getattr(previous, "hides_abandoned_thread_starts", False):  # installed already (in-process CLI calls)
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, KeyError) and value.args and isinstance(value.args[0], threading.Thread):
            return
        previous(unraisable)

    hook.hides_abandoned_thread_starts = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
