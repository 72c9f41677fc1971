"""What this machine offers a run, read without importing torch (so `imgcls predict` on ONNX starts fast):
its CPU (model, vendor, clock, instruction-set flags) and the memory available to this process, inside a
container's limit where there is one."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "model name", as runs and benchmark results record the machine
    vendor: str  # "vendor_id": GenuineIntel, AuthenticAMD; "" where not shown
    mhz: float  # "cpu MHz": a virtual machine reports its base clock (cores may boost above it); 0.0 where not shown
    flags: frozenset[str]  # instruction-set extensions: avx2, fma, avx512f, avx512_bf16, amx_tile, ...


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """The first CPU's entry in /proc/cpuinfo (every core of a machine shows the same one). Where a field is
    missing (not Linux, or an ARM kernel without "model name") the model is platform.processor()'s."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    try:
        mhz = float(fields.get("cpu MHz", 0.0))
    except ValueError:
        mhz = 0.0
    return CpuInfo(
        model=fields.get("model name") or platform.processor() or "unknown CPU",
        vendor=fields.get("vendor_id", ""),
        mhz=mhz,
        flags=frozenset(fields.get("flags", "").split()),
    )


def host_available_memory() -> int:
    """Bytes free on this machine: MemAvailable, or less where this process's cgroup (a container's memory
    limit) leaves less: the kernel kills at that limit, not the host's."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if host is None:
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limited = cgroup_available_memory()
    return host if limited is None else min(host, limited)


def cgroup_available_memory(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``
    as mounted in a container), counting inactive page cache as free (the kernel reclaims it before it kills);
    None where there is no limit or no cgroup to read."""
    for folder, limit_name, usage_name, inactive_name in (
        (root, "memory.max", "memory.current", "inactive_file"),
        (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        try:
            limit_text = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 1 << 60:  # v1's "unlimited"
            return None
        inactive = 0
        try:
            for line in (folder / "memory.stat").read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == inactive_name and value.strip().isdigit():
                    inactive = int(value)
        except OSError:
            pass
        return max(0, int(limit_text) - usage + inactive)
    return None
