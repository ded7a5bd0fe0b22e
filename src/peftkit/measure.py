"""Process memory for benchmarks and ``peftkit compare``: current and peak RSS, and resetting the peak.

Linux keeps a per-process peak RSS (VmHWM, what ``ru_maxrss`` reports); writing "5" to
/proc/self/clear_refs resets it to the current RSS, so a setup-time peak (loading or converting weights)
does not hide the peak of training. Elsewhere the reset is unavailable and the peak covers the whole process.
"""

from __future__ import annotations

import os
import resource


def current_rss() -> int:
    """Resident set size now, in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size since the process started or since :func:`reset_peak_rss`, in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
