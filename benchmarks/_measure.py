"""Shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this folder is on sys.path)."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """This process's peak resident memory.

    VmHWM where there is /proc: ru_maxrss survives exec on Linux, so a child started by a big
    parent would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
