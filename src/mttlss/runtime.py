"""Process set-up that makes the CPU path fast: an allocator that keeps freed tensor memory in the process.

Why: glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB) with a fresh ``mmap`` and
gives it back with ``munmap`` on free. A student unroll allocates and frees tens of MiB of activations per
inner step, so each step faults the same memory back in page by page: on a 2-core AMD EPYC, one outer
iteration at IPC 10 (batch_syn 100, width 128, 10 inner steps) spent 43 s of system time in 59 s and took
8.7 million minor page faults (benchmarks/results/speed_*.json). Two cures, best first:

- **a preloaded allocator** (tcmalloc, else jemalloc, where the system has one: Debian ``libtcmalloc-minimal4``
  / ``libjemalloc2``). It keeps freed memory for reuse and also packs it better than glibc: on that machine,
  IPC 10 / syn_steps 20 ran as fast as or faster than with the glibc setting below, at a lower peak RSS
  (benchmarks/results/speed_cpu_allocators_*.md). An allocator can only be preloaded before the process starts,
  so the command line re-executes itself once, with ``LD_PRELOAD`` set (``exec_with_allocator``);
- **glibc told never to mmap and never to trim** (``mallopt``, at run time): 1.6-2x at IPC 10, but peak RSS stays
  at its high-water mark (about 1.35x the system allocator's).

``MTTLSS_ALLOCATOR`` chooses: ``auto`` (the default: the first of tcmalloc, jemalloc found, else the glibc
setting), ``tcmalloc``, ``jemalloc``, a path to an allocator's shared library, ``glibc`` (mallopt only), or
``system`` (leave everything as it is: the off switch). Nothing here applies where libc is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform
import sys

from mttlss.errors import UserError

# Standard library only: __main__ calls exec_with_allocator before torch is imported (runtime's one torch use,
# available_memory_bytes, imports it where it is needed).

ENV = "MTTLSS_ALLOCATOR"          # auto | tcmalloc | jemalloc | PATH.so | glibc | system (the off switch)
PRELOADED_ENV = "MTTLSS_PRELOADED_ALLOCATOR"   # set by the re-executed process: "name=path"; stops a second exec
CHOICES = ("auto", "tcmalloc", "jemalloc", "glibc", "system")
# allocator -> (shared-library file names, best first; environment it needs). jemalloc returns freed pages to
# the kernel after 10 s by default, which is the very cost being avoided: decay is switched off.
PRELOADABLE = {
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), {}),
    "jemalloc": (("libjemalloc.so.2",), {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
}
LIBRARY_DIRS = ("/usr/lib/*-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib", "/lib/*-linux-gnu")
_M_TRIM_THRESHOLD = -1            # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_MAX = -4
_applied: dict | None = None


class AllocatorChoiceError(UserError):
    """MTTLSS_ALLOCATOR names something that is not there or not known (a user error: one sentence, exit 2)."""


def _is_glibc_linux() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def find_allocator_library(name: str, dirs: tuple[str, ...] | None = None) -> str | None:
    """The path of allocator ``name``'s shared library (see PRELOADABLE): the Python environment's own lib
    folder (conda), then the system's; None where none is installed."""
    files, _ = PRELOADABLE[name]
    folders = [os.path.join(sys.prefix, "lib")] if dirs is None else []
    for pattern in (LIBRARY_DIRS if dirs is None else dirs):
        folders += sorted(glob.glob(pattern))
    for file in files:
        for folder in folders:
            path = os.path.join(folder, file)
            if os.path.isfile(path):
                return path
    return None


def allocator_plan(environ: dict | None = None, dirs: tuple[str, ...] | None = None) -> dict:
    """What MTTLSS_ALLOCATOR asks for on this system, without doing it.

    Returns {"allocator": name, "library": path or None, "env": {...} to preload with (empty: no re-exec)};
    raises AllocatorChoiceError for a value that names nothing usable.
    """
    environ = os.environ if environ is None else environ
    choice = environ.get(ENV, "").strip() or "auto"
    if environ.get(PRELOADED_ENV):  # this process was re-executed with it already
        name, _, path = environ[PRELOADED_ENV].partition("=")
        return {"allocator": name, "library": path, "env": {}}
    if choice not in CHOICES and os.sep not in choice:
        raise AllocatorChoiceError(f"{ENV}={choice!r} is not an allocator choice: use one of {', '.join(CHOICES)} "
                                   f"or the path of an allocator's shared library (libtcmalloc.so...)")
    if choice in ("glibc", "system") or not _is_glibc_linux():
        return {"allocator": "glibc-tuned" if choice != "system" else "system", "library": None, "env": {}}
    if os.sep in choice:
        if not os.path.isfile(choice):
            raise AllocatorChoiceError(f"{ENV}={choice!r}: no such file; give the path of an allocator's shared "
                                       f"library, or unset {ENV}")
        name, path, extra = os.path.basename(choice), choice, {}
    else:
        names = ("tcmalloc", "jemalloc") if choice == "auto" else (choice,)
        found = [(n, find_allocator_library(n, dirs)) for n in names]
        found = [(n, p) for n, p in found if p is not None]
        if not found:
            if choice == "auto":
                return {"allocator": "glibc-tuned", "library": None, "env": {}}
            package = "libtcmalloc-minimal4" if choice == "tcmalloc" else "libjemalloc2"
            raise AllocatorChoiceError(f"{ENV}={choice} but no {PRELOADABLE[choice][0][0]} was found; install it "
                                       f"(Debian/Ubuntu: apt install {package}), give its path in {ENV}, or unset {ENV}")
        (name, path), extra = found[0], PRELOADABLE[found[0][0]][1]
    preload = " ".join(p for p in (path, environ.get("LD_PRELOAD", "")) if p)
    return {"allocator": name, "library": path,
            "env": {**extra, "LD_PRELOAD": preload, PRELOADED_ENV: f"{name}={path}"}}


def exec_with_allocator() -> None:
    """Re-execute this process (same interpreter, same command line) with the chosen allocator preloaded; return
    at once where nothing is to be preloaded or it already is. Call it first thing, before heavy imports: the
    `mttlss` command does (__main__.run). A failing exec leaves the process as it was (tune_allocator then
    applies the glibc setting)."""
    try:
        plan = allocator_plan()
    except AllocatorChoiceError:
        return  # said in one sentence by the command line (tune_allocator raises it there)
    if not plan["env"] or not getattr(sys, "orig_argv", None):
        return
    os.environ.update(plan["env"])
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        for key in plan["env"]:
            os.environ.pop(key, None)


def tune_allocator(*, force: bool = False) -> dict:
    """Make this process's allocator keep freed memory; returns what is in effect, e.g. ``{"allocator":
    "tcmalloc", "library": "/usr/lib/.../libtcmalloc_minimal.so.4"}`` or ``{"allocator": "glibc-tuned"}``.

    Where exec_with_allocator preloaded an allocator, that is reported; otherwise glibc's malloc is told never to
    mmap and never to trim (``force``: even under ``MTTLSS_ALLOCATOR=system``). Idempotent; raises
    AllocatorChoiceError for a value of MTTLSS_ALLOCATOR that names nothing usable.
    """
    global _applied
    if _applied is not None:
        return _applied
    plan = allocator_plan()
    if plan["library"] is not None and not plan["env"]:
        _applied = {"allocator": plan["allocator"], "library": plan["library"], "why": "preloaded"}
        return _applied
    if plan["allocator"] == "system" and not force:
        _applied = {"allocator": "system", "why": f"{ENV}=system"}
        return _applied
    if not _is_glibc_linux():
        _applied = {"allocator": "system", "why": "not glibc"}
        return _applied
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = {"allocator": "glibc-tuned" if ok else "system", "why": "mallopt" if ok else "mallopt refused"}
    return _applied


def allocator_status() -> dict:
    """This process's allocator: what tune_allocator did once it ran, else what was preloaded, else the system's."""
    if _applied is not None:
        return dict(_applied)
    try:
        plan = allocator_plan()
    except AllocatorChoiceError as exc:
        return {"allocator": "system", "why": str(exc)}
    if plan["library"] is not None and not plan["env"]:
        return {"allocator": plan["allocator"], "library": plan["library"], "why": "preloaded"}
    return {"allocator": "system", "why": "not set up (the command line does; from Python: mttlss.tune_allocator())"}


def describe_allocator(status: dict) -> str:
    """One line for the log: which allocator, and the off switch."""
    where = f" ({status['library']}, preloaded)" if status.get("library") else f" ({status['why']})"
    switch = f"; {ENV}=system switches it off" if status["allocator"] != "system" else ""
    return f"allocator: {status['allocator']}{where}{switch}"


def available_memory_bytes(device: str) -> int | None:
    """Memory a run on ``device`` can still take: free GPU memory, or MemAvailable of /proc/meminfo on the CPU
    (None where neither can be read)."""
    if device.startswith("cuda"):
        import torch

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
