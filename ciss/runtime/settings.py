"""`ciss live`'s settings, each key with its default in one table, and the inference backends by name.

Neither torch nor ONNX Runtime is imported here, so the command line reads the defaults and the
choices before a model is loaded. A `--config FILE`'s `[live]` table and `--set live.KEY=VALUE` set
them the way they set `ciss learn`'s (ciss/config.py); a flag typed on the command line wins over
both. What to serve and where its frames come from and go (--camera, --source, --repo, --name, --pin,
--topic, --save..., --foxglove) and the values chosen at run time when not given (--threads, --fps,
--max-frames) are flags only.
"""

from __future__ import annotations

from ciss.config import Settings
from ciss.errors import CissError
from ciss.sizes import DEFAULT_RESIZE, RESIZE_MODES

# ciss/runtime/backends.py loads them, but torch: the command line builds it (ciss/apps/reference.py)
KINDS = ("auto", "tensorrt", "ort-trt", "ort-cuda", "ort-cpu", "ort-int8", "torch")

LIVE = Settings.table("live", {
    "backend": "auto",        # one of KINDS; torch is a debugging reference that needs the training extra
    "poll_s": 0.5,            # seconds between repository checks
    "resize": DEFAULT_RESIZE,  # how frames of another shape fit a fixed-size model (ciss.sizes)
    "headless": False,        # no window
    "loop": False,            # restart files and image folders at the end
    "realtime": False,        # play a recording at its recorded rate, dropping what the model cannot keep up with
    "alpha": 0.5,             # overlay opacity
    "legend": True,           # the class legend on the overlay
    "hud": True,              # the FPS/latency/version line on the overlay
}, command="ciss live", example="live.backend=ort-cpu", choices={"backend": KINDS, "resize": RESIZE_MODES})


def check_kind(kind: str) -> str:
    """`kind` if it names a backend, else the one-line refusal that lists them."""
    if kind not in KINDS:
        raise CissError(f"unknown backend '{kind}'; choose one of {', '.join(KINDS)}")
    return kind
