"""Files that later stages trust: hashing, atomic writes, and the step manifest.

Every manifest is written whole or not at all (temp file + rename, fsynced), so a reader never
sees half a file, and every weights file is named together with its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from ciss.errors import CissError

STEP_FORMAT = "ciss.step/1"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # name the file a full disk refused
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path, what: str = "manifest") -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CissError(f"no {what} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CissError(f"corrupt {what} {path}: {e}; restore it or re-create the step") from None


def library_versions() -> dict[str, str]:
    """Versions that decide whether a result can be reproduced."""
    import cv2
    import numpy
    import torch

    import ciss

    return {"ciss": ciss.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "opencv": cv2.__version__}
