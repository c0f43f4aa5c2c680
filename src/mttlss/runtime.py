"""Process set-up that makes the CPU path fast: keep freed tensor memory in the process (glibc malloc).

Why: glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB) with a fresh ``mmap`` and
gives it back with ``munmap`` on free. A student unroll allocates and frees tens of MiB of activations per
inner step, so each step faults the same memory back in page by page: on a 2-core AMD EPYC, one outer
iteration at IPC 10 (batch_syn 100, width 128, 10 inner steps) spent 43 s of system time in 59 s and took
8.7 million minor page faults (benchmarks/results/speed_*.json). Telling malloc never to mmap and never to
trim its heap keeps that memory mapped between steps: the same iteration ran 1.6-2x faster (page faults
1.4 million). The cost is that peak RSS stays at its high-water mark instead of shrinking between steps.

``tune_allocator()`` does this with ``mallopt`` at run time (no re-exec, no preloaded library); the CLI
calls it unless ``MTTLSS_ALLOCATOR=system``. It does nothing where libc is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

import torch

ENV = "MTTLSS_ALLOCATOR"        # "system": leave malloc as it is (the off switch)
_M_TRIM_THRESHOLD = -1          # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_MAX = -4
_applied: dict | None = None


def tune_allocator(*, force: bool = False) -> dict:
    """Keep freed memory in the heap (glibc only); returns what was done, e.g. ``{"allocator": "glibc-tuned"}``.

    Idempotent. ``MTTLSS_ALLOCATOR=system`` switches it off unless ``force``.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV, "").lower() == "system" and not force:
        _applied = {"allocator": "system", "why": f"{ENV}=system"}
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _applied = {"allocator": "system", "why": "not glibc"}
        return _applied
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = {"allocator": "glibc-tuned" if ok else "system", "why": "mallopt" if ok else "mallopt refused"}
    return _applied


def available_memory_bytes(device: str) -> int | None:
    """Memory a run on ``device`` can still take: free GPU memory, or MemAvailable of /proc/meminfo on the CPU
    (None where neither can be read)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
