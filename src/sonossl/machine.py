"""Which machine a measurement comes from, for benchmark records.

Timings differ by about 2x between the CPU models these benchmarks have run on, and so do trained weights (the same
data, seeds and code give other floating-point results on another CPU), so every record names the CPU model, not
only the architecture.

    describe()   # 'AMD EPYC, 2 cores, x86_64'
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows, else the architecture."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """``'<CPU model>, <n> cores, <architecture>'``."""
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}"
