"""Folders that appear whole or not at all: filled under a hidden name, fsynced, renamed into place.

The run store commits `step-<k>/` and the model repository publishes `<name>/<version>/` this way,
so a reader (a later `ciss learn`, the live runtime polling for models) sees a finished folder or
nothing. A staging folder is named `.staging-<label>-<pid>-<token>` after the process filling it:
one killed mid-write leaves its folder behind, and `remove_dead_staging` clears those of processes
that are gone. Only the standard library and `ciss.manifest` are imported: the runtime reads
repositories without torch.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from types import TracebackType

from ciss.manifest import fsync_dir

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # a label naming this host
_STAGING = re.compile(r"\.staging-(?P<label>.+)-(?P<pid>[0-9]+)-[0-9a-f]+")
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR)  # rename(2) onto a non-empty folder or a file


def _process_alive(pid: int) -> bool:
    """Whether a process of this host still runs: a staging folder named after a dead one is litter."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class StagingFolder:
    """`with StagingFolder(parent, label) as staging:` fill `staging.path`, then `staging.publish(final)`.

    The folder is created on entry, next to where it will be published (a rename never crosses file
    systems); if it was not published when the block ends (an error, an early return), it is removed.
    """

    def __init__(self, parent: Path, label: str):
        self.parent = Path(parent)
        self.path = self.parent / f".staging-{label}-{os.getpid()}-{uuid.uuid4().hex}"
        self._published = False

    def __enter__(self) -> StagingFolder:
        self.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if not self._published:
            shutil.rmtree(self.path, ignore_errors=True)

    def publish(self, final: Path) -> None:
        """Flush every staged file and folder, rename the staging folder to `final`, and make the rename
        durable. FileExistsError when `final` is taken (a non-empty folder or a file), the staging
        folder then being left to publish under another name."""
        for p in sorted(self.path.rglob("*"), reverse=True):  # files before the folders that hold them
            if p.is_dir():
                fsync_dir(p)
            else:
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(self.path)
        try:
            os.rename(self.path, final)
        except OSError as e:
            if e.errno in _TAKEN:
                raise FileExistsError(e.errno, e.strerror, str(final)) from None
            raise
        self._published = True
        fsync_dir(Path(final).parent)


def remove_dead_staging(folder: Path, label: str) -> list[str]:
    """Remove the staging folders in `folder` whose label fullmatches the regular expression `label`
    and whose process died (killed, out of memory): nobody will ever publish them. Returns their
    names. A label naming this host (`HOST`) leaves alone the folders of other hosts sharing the
    folder, whose processes cannot be asked about; POSIX only, where a process can be probed."""
    if os.name != "posix" or not Path(folder).is_dir():
        return []
    removed = []
    for path in sorted(Path(folder).iterdir()):
        owner = _STAGING.fullmatch(path.name)
        if owner and re.fullmatch(label, owner["label"]) and not _process_alive(int(owner["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path.name)
    return removed
