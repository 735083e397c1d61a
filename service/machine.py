"""What this machine can do, read once from /proc (Linux): CPU model, matmul flags, cores, and whether it is busy.

Used by the service (`XCROSS_BACKEND=auto` picks bf16 where the CPU has bf16 matmul instructions) and by the
benchmarks (every run prints the CPU model and flags, and says whether another process was using the cores).

    python -c "from service.machine import describe; print(describe())"

`tune_malloc()` stops glibc from serving large tensors with fresh `mmap` pages: above 32 MiB (the largest
mmap threshold glibc allows) every allocation is a new mapping whose pages fault in on first touch, so a
60-prompt batch of MiniLM (37 MB FFN activations) paid page faults on every forward (measured: plain MiniLM at
60 prompts 1.56 s -> 1.11 s on one thread). The memory of the largest batch stays with the process instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import time
from pathlib import Path

CPUINFO = "/proc/cpuinfo"
# The flags that decide matmul speed: bf16 (AMX tiles, AVX-512 BF16) and int8 (AMX, VNNI).
MATMUL_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_malloc_tuned: bool | None = None


def _read(cpuinfo: str | Path) -> str:
    try:
        return Path(cpuinfo).read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | Path = CPUINFO) -> set[str]:
    """Every flag the CPU advertises (empty when /proc/cpuinfo is unreadable)."""
    flags: set[str] = set()
    for line in _read(cpuinfo).splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return flags


def cpu_bf16_flags(cpuinfo: str | Path = CPUINFO) -> list[str]:
    """The bf16 matmul flags this CPU advertises (empty when unknown)."""
    flags = cpu_flags(cpuinfo)
    return [f for f in BF16_FLAGS if f in flags]


def cpu_model(cpuinfo: str | Path = CPUINFO) -> str:
    for line in _read(cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def busy_cores(seconds: float = 0.5) -> float:
    """Cores kept busy by other processes while this one sleeps for `seconds` (from /proc/stat; 0 if unknown)."""

    def sample() -> tuple[float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [float(x) for x in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)  # idle + iowait
        return sum(ticks), idle

    a = sample()
    time.sleep(seconds)
    b = sample()
    if a is None or b is None or b[0] <= a[0]:
        return 0.0
    cores = os.cpu_count() or 1
    return round(cores * (1 - (b[1] - a[1]) / (b[0] - a[0])), 2)


def busy_processes(limit: int = 4, min_cpu: float = 20.0) -> list[str]:
    """The other processes using the most CPU right now (`ps`; empty when it is unavailable)."""
    import subprocess

    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=5).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out:
        pid, cpu, args = line.split(None, 2)
        if int(pid) != os.getpid() and float(cpu) >= min_cpu:
            rows.append(f"{float(cpu):.0f}% {args[:90]}")
    return rows[:limit]


def describe(cpuinfo: str | Path = CPUINFO, probe_load: bool = False) -> dict:
    """CPU model, the matmul flags present, core count; with `probe_load`, cores busy with other work."""
    flags = cpu_flags(cpuinfo)
    out = {"cpu": cpu_model(cpuinfo), "cores": os.cpu_count() or 1,
           "flags": {f: f in flags for f in MATMUL_FLAGS}}
    if probe_load:
        out["busy_cores_before"] = busy_cores()
        out["loadavg_1m"] = round(os.getloadavg()[0], 2)
        out["busy_processes"] = busy_processes()
    return out


def tune_malloc() -> bool:
    """Keep large allocations on the heap and never trim it (glibc only; True when applied)."""
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        name = ctypes.util.find_library("c")
        if platform.system() == "Linux" and name and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(name)
            _malloc_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _malloc_tuned
