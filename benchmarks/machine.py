"""What a CPU figure needs beside it: the processor model and the instructions that decide int8 speed."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")  # x86 VNNI/AMX, Arm dot product


def cpu_description() -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores, flags: avx2 avx512f avx512_vnni ...' (Linux; best effort elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and model in ("", platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags |= set(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    have = [f for f in FLAGS if f in flags]
    return f"{model}, {cores} cores, flags: {' '.join(have) or 'none of ' + ' '.join(FLAGS)}"


if __name__ == "__main__":
    print(cpu_description())
