"""relay.procmem on Linux: the peak resets to the current size, and trim_heap hands freed heap pages back so a
later phase's peak shows its own use (the memory tests of the learner rely on both)."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and glibc: Linux only")

SCRIPT = """
import ctypes, json
from relay.procmem import memory_mib
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
base = memory_mib(reset=True)
chunks = [libc.malloc(64 * 1024) for _ in range(3200)]  # 200 MiB in heap-sized pieces (below mmap's threshold)
for c in chunks:
    ctypes.memset(c, 1, 64 * 1024)
used = memory_mib()
for c in chunks[:-1]:  # the last one pins the heap's top: only malloc_trim's page-wise release can free the rest
    libc.free(c)
freed = memory_mib()
trimmed = memory_mib(reset=True, trim=True)
after = memory_mib()
print(json.dumps({"base": base, "used": used, "freed": freed, "trimmed": trimmed, "after": after}))
"""


def test_peak_reset_and_heap_trim():
    import json

    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["used"]["peak"] - m["base"]["rss"] > 180  # the 200 MiB were touched
    assert m["freed"]["rss"] - m["base"]["rss"] > 180  # freed, yet still resident: glibc keeps them
    assert m["freed"]["rss"] - m["trimmed"]["rss"] > 150  # trimmed: handed back to the kernel
    assert m["after"]["peak"] - m["trimmed"]["rss"] < 20  # the peak restarted from the trimmed size
