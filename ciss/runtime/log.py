"""Where the runtime's progress lines go.

Every entry point takes a `log` callable (the CLI passes one that writes to stderr); without one,
lines go to the "ciss.runtime" logger at INFO, so library code never prints and the application
decides what is shown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

Log = Callable[[str], None]
LOGGER = logging.getLogger("ciss.runtime")
