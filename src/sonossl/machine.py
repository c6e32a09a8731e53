"""Which machine a measurement comes from, for benchmark records.

Timings differ by about 2x between the CPU models these benchmarks have run on, and so do trained weights (the same
data, seeds and code give other floating-point results on another CPU), so every record names the CPU model, not
only the architecture. A virtual machine may show only a vendor's family name ("AMD EPYC" for a Zen 2 and a Zen 4
alike), so the record adds the CPU family and model numbers and the widest vector instructions (AVX-512 or AVX2),
which are what decide both the speed and the rounding of the math libraries.

    describe()   # 'AMD EPYC (family 25 model 17, AVX-512), 2 cores, x86_64'
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

_ISA = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("asimd", "NEON"))


def _fields(cpuinfo: str | Path) -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo; empty when it cannot be read."""
    fields: dict[str, str] = {}
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    return fields


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows, else the architecture."""
    fields = _fields(cpuinfo)
    for key in ("model name", "Model", "cpu model"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or platform.machine()


def cpu_details(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """``'family 25 model 17, AVX-512'``: what tells apart CPUs that share a model name; empty if unknown."""
    fields = _fields(cpuinfo)
    parts = []
    if fields.get("cpu family") and fields.get("model"):
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    isa = next((name for flag, name in _ISA if flag in flags), None)
    if isa:
        parts.append(isa)
    return ", ".join(parts)


def describe(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """``'<CPU model> (<family/model, vector ISA>), <n> cores, <architecture>'``."""
    details = cpu_details(cpuinfo)
    cpu = f"{cpu_model(cpuinfo)} ({details})" if details else cpu_model(cpuinfo)
    return f"{cpu}, {os.cpu_count()} cores, {platform.machine()}"


def cpu_quota(cgroup: str | Path = "/sys/fs/cgroup") -> int | None:
    """The CPUs this container may use by its cgroup's CPU limit, rounded up (a Kubernetes ``limits.cpu``, a
    ``docker run --cpus``), or None without a limit. torch sizes its thread pool by the host's cores, not by the
    limit: on a 64-core node a server limited to 2 CPUs would run 32 threads and spend its quota being throttled.
    cgroup v2 (``cpu.max``: ``<quota> <period>`` or ``max``), else v1 (``cpu/cpu.cfs_quota_us``, -1: none)."""
    root = Path(cgroup)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else max(1, -(-quota // period))
