"""Machine details for benchmark reports (CPU, cores, memory, Python, package versions)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def versions(*packages: str) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "-"
    return out


def mosquitto_version() -> str:
    try:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
        return out.splitlines()[0].replace("mosquitto version ", "") if out else "-"
    except OSError:
        return "-"


def describe(*packages: str) -> str:
    """One markdown line."""
    v = versions(*packages)
    pk = ", ".join(f"{k} {val}" for k, val in v.items())
    load = os.getloadavg()[0]
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {mem_gib():.0f} GiB, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"mosquitto {mosquitto_version()}; {pk}; load average at start {load:.2f}"
    )
