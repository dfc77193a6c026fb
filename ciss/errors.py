"""The one exception type for mistakes a user can make (paths, names, corrupt files, hardware).

The CLI prints its message as a single line on stderr and exits with code 2; anything else that
escapes is a bug and keeps its traceback, except the machine's own limits (`environment_error`).
"""

import errno

_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
         errno.EFBIG: "the file-size limit is reached"}


class CissError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""


def environment_error(e: BaseException, command: str | None = None) -> CissError | None:
    """A user-facing error for what the machine refused (a full disk, a file-size limit, a data-loading
    worker killed by the system), or None for anything else. Files written atomically stay whole, and
    `ciss learn` keeps a step's last checkpoint, so the message says how to go on."""
    again = "run it again with --resume" if command == "learn" else "run the command again"
    if isinstance(e, OSError) and e.errno in _FULL:
        where = f"writing {e.filename}" if e.filename else "writing a file"
        return CissError(f"{_FULL[e.errno]} ({where}: {e.strerror}); free some space or raise the limit, then {again}")
    if isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker ("):
        return CissError(f"{str(e).splitlines()[0].rstrip('. ')}; if the system ran out of memory, set "
                         f"train.workers lower (0: no worker processes), then {again}")
    return None
