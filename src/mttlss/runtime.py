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
  so the command line re-executes itself once, with ``LD_PRELOAD`` set (``exec_with_allocator``), and then
  gives the user's environment back, so that its own child processes start as the user would start them;
- **glibc told never to mmap and never to trim** (``mallopt``, at run time): 1.6-2x at IPC 10, but peak RSS stays
  at its high-water mark (about 1.4x the system allocator's at IPC 10).

``MTTLSS_ALLOCATOR`` chooses: ``auto`` (the default: the first of tcmalloc, jemalloc found, else the glibc
setting), ``tcmalloc``, ``jemalloc``, a path to an allocator's shared library, ``glibc`` (mallopt only), or
``system`` (leave everything as it is: the off switch). Nothing here applies where libc is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import sys
import sysconfig

from mttlss.errors import UserError

# Standard library only: __main__ calls exec_with_allocator before torch is imported (runtime's one torch use,
# available_memory_bytes, imports it where it is needed).

ENV = "MTTLSS_ALLOCATOR"          # auto | tcmalloc | jemalloc | PATH.so | glibc | system (the off switch)
# Set just before the exec, read (and removed) by the re-executed process, which has the same PID: JSON with that
# PID, the allocator, its library and the user's own LD_PRELOAD / MALLOC_CONF, restored so that child processes
# (git, spawned workers) see the environment the user gave.
PRELOADED_ENV = "MTTLSS_PRELOADED_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "jemalloc", "glibc", "system")
# allocator -> (shared-library file names, best first; environment it needs). jemalloc returns freed pages to
# the kernel after 10 s by default, which is the very cost being avoided: decay is switched off.
PRELOADABLE = {
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), {}),
    "jemalloc": (("libjemalloc.so.2",), {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
}
_MULTIARCH = sysconfig.get_config_var("MULTIARCH") or ""   # x86_64-linux-gnu: this interpreter's architecture
LIBRARY_DIRS = tuple(d for d in (f"/usr/lib/{_MULTIARCH}" if _MULTIARCH else "", f"/lib/{_MULTIARCH}" if _MULTIARCH
                                 else "", "/usr/lib64", "/usr/lib", "/usr/local/lib") if d)
_M_TRIM_THRESHOLD = -1            # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_MAX = -4
_applied: dict | None = None      # what tune_allocator did
_preloaded: dict | None = None    # what exec_with_allocator preloaded into this process (checked in its maps)


class AllocatorChoiceError(UserError):
    """MTTLSS_ALLOCATOR names something that is not there or not known (a user error: one sentence, exit 2)."""


def _is_glibc_linux() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def find_allocator_library(name: str, dirs: tuple[str, ...] | None = None) -> str | None:
    """The path of allocator ``name``'s shared library (see PRELOADABLE): the Python environment's own lib
    folder (conda), then the system's folders for this interpreter's architecture; None where none is installed."""
    files, _ = PRELOADABLE[name]
    folders = (os.path.join(sys.prefix, "lib"), *LIBRARY_DIRS) if dirs is None else dirs
    for file in files:
        for folder in folders:
            path = os.path.join(folder, file)
            if os.path.isfile(path):
                return path
    return None


def _known_allocator(path: str) -> tuple[str, dict]:
    """(name, settings) of a library path: a known allocator's file name gets its settings (jemalloc's decay)."""
    for name, (files, extra) in PRELOADABLE.items():
        if os.path.basename(path) in files:
            return name, extra
    return os.path.basename(path), {}


def allocator_plan(environ: dict | None = None, dirs: tuple[str, ...] | None = None) -> dict:
    """What MTTLSS_ALLOCATOR asks for on this system, without doing it.

    Returns {"allocator": name, "library": path or None, "env": {...} to preload with (empty: no re-exec)};
    raises AllocatorChoiceError for a value that names nothing usable. On anything but glibc Linux nothing is
    preloaded or tuned, whatever the value (it is still checked to be a known word or a path).
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV, "").strip() or "auto"
    is_path = os.sep in raw
    choice = raw if is_path else raw.lower()
    if not is_path and choice not in CHOICES:
        raise AllocatorChoiceError(f"{ENV}={raw!r} is not an allocator choice: use one of {', '.join(CHOICES)} "
                                   f"or the path of an allocator's shared library (libtcmalloc.so...)")
    if not _is_glibc_linux():
        return {"allocator": "system", "library": None, "env": {}}
    if choice in ("glibc", "system"):
        return {"allocator": "glibc-tuned" if choice == "glibc" else "system", "library": None, "env": {}}
    if is_path:
        path = os.path.abspath(choice)
        if not os.path.isfile(path):
            raise AllocatorChoiceError(f"{ENV}={raw!r}: no such file; give the path of an allocator's shared "
                                       f"library, or unset {ENV}")
        if any(c in path for c in " :"):  # LD_PRELOAD splits its list on both
            raise AllocatorChoiceError(f"{ENV}={raw!r}: LD_PRELOAD cannot take a path with a space or a colon; "
                                       f"link the library from a folder whose path has neither")
        (name, extra) = _known_allocator(path)
    else:
        names = ("tcmalloc", "jemalloc") if choice == "auto" else (choice,)
        found = [(n, find_allocator_library(n, dirs)) for n in names]
        found = [(n, p) for n, p in found if p is not None]
        if not found:
            if choice == "auto":
                return {"allocator": "glibc-tuned", "library": None, "env": {}}
            package = "libtcmalloc-minimal4" if choice == "tcmalloc" else "libjemalloc2"
            raise AllocatorChoiceError(f"{ENV}={raw} but no {PRELOADABLE[choice][0][0]} was found; install it "
                                       f"(Debian/Ubuntu: apt install {package}), give its path in {ENV}, or unset {ENV}")
        (name, path), extra = found[0], PRELOADABLE[found[0][0]][1]
    env = {"LD_PRELOAD": " ".join(p for p in (path, environ.get("LD_PRELOAD", "")) if p)}
    for key, value in extra.items():  # added to the user's own settings, not replacing them
        env[key] = ",".join(v for v in (environ.get(key, ""), value) if v)
    return {"allocator": name, "library": path, "env": env}


def library_mapped(path: str) -> bool:
    """Whether the shared library at ``path`` is loaded into this process (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as fh:
            return os.path.realpath(path) in fh.read()
    except OSError:
        return False


def launched_as_command() -> bool:
    """Whether this process is the `mttlss` command itself (``python -m mttlss ...``, the console script, a
    torchrun rank of ``-m mttlss``), so that re-running its interpreter command line re-runs only that command;
    False for a host that runs mttlss inside itself (runpy, a notebook, a test)."""
    orig, n = list(getattr(sys, "orig_argv", None) or []), len(sys.argv) - 1
    if len(orig) < n + 2 or orig[len(orig) - n:] != sys.argv[1:]:
        return False
    head = orig[:len(orig) - n]
    module = head[-2:] == ["-m", "mttlss"] or head[-1] == "-mmttlss"
    script = os.path.abspath(head[-1]) == os.path.abspath(sys.argv[0])
    return module or script


def _set_environment(values: dict) -> None:
    """Set each variable to its value; None removes it."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def exec_with_allocator() -> None:
    """Re-execute this process (same interpreter, same command line, same PID) with the chosen allocator preloaded;
    return at once where nothing is to be preloaded, where this process is not the mttlss command, or in the
    re-executed process itself, which checks that the library is mapped and restores the user's environment.
    Call it first thing, before heavy imports: the `mttlss` command does (__main__.entry). A failing exec leaves
    the process and its environment as they were (tune_allocator then applies the glibc setting)."""
    global _preloaded
    marker = os.environ.pop(PRELOADED_ENV, None)
    if marker is not None:
        try:
            info = json.loads(marker)
            mine = info["pid"] == os.getpid()
        except (ValueError, KeyError, TypeError):
            mine = False
        if mine:  # the re-executed process: give the user's environment back to whatever it starts
            _set_environment(info["restore"])
            _preloaded = {"allocator": info["allocator"], "library": info["library"],
                          "mapped": library_mapped(info["library"])}
            return
    try:
        plan = allocator_plan()
    except AllocatorChoiceError:
        return  # said in one sentence by the command line (tune_allocator raises it there)
    if not plan["env"] or not launched_as_command():
        return
    restore = {key: os.environ.get(key) for key in plan["env"]}
    os.environ.update(plan["env"])
    os.environ[PRELOADED_ENV] = json.dumps({"pid": os.getpid(), "allocator": plan["allocator"],
                                            "library": plan["library"], "restore": restore})
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError:
        _set_environment({**restore, PRELOADED_ENV: None})


def tune_allocator(*, force: bool = False) -> dict:
    """Make this process's allocator keep freed memory; returns what is in effect, e.g. ``{"allocator":
    "tcmalloc", "library": "/usr/lib/.../libtcmalloc_minimal.so.4"}`` or ``{"allocator": "glibc-tuned"}``.

    Where exec_with_allocator preloaded an allocator (and it is mapped), that is reported; otherwise glibc's malloc
    is told never to mmap and never to trim (``force``: even under ``MTTLSS_ALLOCATOR=system``). Idempotent; raises
    AllocatorChoiceError for a value of MTTLSS_ALLOCATOR that names nothing usable.
    """
    global _applied
    if _applied is not None:
        return _applied
    plan = allocator_plan()
    if _preloaded is not None and _preloaded["mapped"]:
        _applied = {"allocator": _preloaded["allocator"], "library": _preloaded["library"], "why": "preloaded"}
        return _applied
    failed = (f"{_preloaded['library']} could not be preloaded (see the loader's message); "
              if _preloaded is not None else "")
    if plan["allocator"] == "system" and not force:
        _applied = {"allocator": "system", "why": failed + (f"{ENV}=system" if _is_glibc_linux() else "not glibc")}
        return _applied
    if not _is_glibc_linux():
        _applied = {"allocator": "system", "why": "not glibc"}
        return _applied
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = {"allocator": "glibc-tuned" if ok else "system", "why": failed + ("mallopt" if ok else "mallopt refused")}
    return _applied


def allocator_status() -> dict:
    """This process's allocator: what tune_allocator did once it ran, else what was preloaded, else the system's."""
    if _applied is not None:
        return dict(_applied)
    if _preloaded is not None and _preloaded["mapped"]:
        return {"allocator": _preloaded["allocator"], "library": _preloaded["library"], "why": "preloaded"}
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


# x86 CPU flags (as /proc/cpuinfo and lscpu spell them) of native bf16 matrix instructions, best first: Intel's AMX
# tiles, then AVX-512 BF16 (the bf16 dot products of Intel Cooper Lake and later, and of AMD Zen 4 and later).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The flag that makes bf16 matrix work native on this CPU (``NATIVE_BF16_FLAGS``), or None: none of them,
    another architecture, or no /proc/cpuinfo. ``cpuinfo``: that file's text (tests)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:   # every core lists the same flags: the first line will do
            flags = set(line.split(":", 1)[1].split())
            break
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)
