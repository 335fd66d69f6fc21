"""Resident memory of a process from /proc (Linux): now, and the peak since start or since the last reset.

The peak is the kernel's high-water mark (VmHWM); writing 5 to /proc/PID/clear_refs resets it to the current
resident size, so a phase's own peak can be measured inside a long-lived actor. Elsewhere (no /proc) the
functions return None and reset does nothing.
"""
from __future__ import annotations

from pathlib import Path


def _status_kib(pid: int | None, field: str) -> int | None:
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # "VmHWM:  123456 kB"
    return None


def rss_mib(pid: int | None = None) -> float | None:
    """Resident set size now, MiB (this process when pid is None)."""
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib(pid: int | None = None) -> float | None:
    """Peak resident set size since the process started or since `reset_peak_rss`, MiB."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib / 1024


def reset_peak_rss(pid: int | None = None) -> bool:
    """Set the peak back to the current resident size; False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid or 'self'}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim); True if any went back, False if
    none did or there is no glibc.
    Freed memory otherwise stays resident: a later phase that reuses it shows no growth of its own."""
    import ctypes

    try:  # the process's own symbols: glibc's when linked against it (no library search, no ldconfig run)
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def memory_mib(reset: bool = False, trim: bool = False) -> dict[str, float | None]:
    """{'rss', 'peak'} of this process in MiB; `reset`: start a new peak after reading (to measure one phase);
    `trim`: first return freed heap pages to the kernel (`trim_heap`), so the phase's peak counts what it uses."""
    if trim:
        trim_heap()
    out = {"rss": rss_mib(), "peak": peak_rss_mib()}
    if reset:
        reset_peak_rss()
    return out
