"""What the user can fix, and how the CLI says so.

``UserError`` is a mistake in what the user asked for or gave (a flag, a path, a dataset, a manifest): the
CLI prints its message, one sentence that names what is wrong and the fix, and exits 2 without a traceback.
Every other exception is a bug: the CLI shows its traceback and asks the user to report it. Each module's own
error class (``DatasetError``, ``ExpertError``, ``ArtifactError``, ``DistillError``) is a ``UserError``, and
subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.

``DiskFullError`` is what a write that ran out of space becomes: it names the full folder and says that what
was written before (atomically: the last checkpoint, the finished experts) is intact.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C
INTERRUPTED = "interrupted; rerun the same command to resume"
DEBUG_ENV = "MTTLSS_DEBUG"  # set (to anything): user errors raise with their traceback, as --debug does


class UserError(ValueError):
    """A mistake the user can fix; the message names what is wrong and the fix."""


class DiskFullError(UserError, OSError):
    """A write failed because the disk (or quota) holding ``folder`` is full."""

    def __init__(self, folder: str | os.PathLike, detail: str = ""):
        self.folder = Path(folder)
        super().__init__(f"the disk holding {self.folder} is full{f' ({detail})' if detail else ''}; free space "
                         "there (or write elsewhere) and rerun the same command: the files written before, such as "
                         "the last checkpoint and the finished experts, are intact")


# How the writers we call report a full disk when they do not raise OSError(ENOSPC): safetensors
# ("IoError(Os { code: 28, kind: StorageFull ... })") and torch.save's zip writer ("file write failed",
# "unexpected pos 7296 vs 7184", which is a short write).
_FULL_MARKERS = ("no space left", "code: 28", "storagefull", "disk quota", "file write failed", "unexpected pos")
_NEARLY_FULL_BYTES = 1 << 20


def is_disk_full(exc: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` from a write into ``folder`` means the disk is full (errno, a writer's text, or free space)."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)) and "safetensor" not in type(exc).__name__.lower():
        return False  # our own checks (ValueError, TypeError) are never about the disk
    text = str(exc).lower()
    if any(marker in text for marker in _FULL_MARKERS):
        return True
    if folder is None:
        return False
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def user_message(exc: BaseException) -> str:
    """The exception's sentence: KeyError's own text without the quotes ``str(KeyError)`` adds."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename is not None:
        return _os_message(exc)
    return str(exc)


def _os_message(exc: OSError) -> str:
    """A sentence for the file errors a user causes (a missing, unreadable or too long path)."""
    name = exc.filename
    fixes = {
        errno.ENOENT: "check the path",
        errno.EACCES: "check its permissions, or choose a path you can write to",
        errno.EPERM: "check its permissions, or choose a path you can write to",
        errno.EISDIR: "give a file path, not a folder",
        errno.ENOTDIR: "a part of the path is a file; give a path whose parents are folders",
        errno.EEXIST: "remove it or choose another path",
        errno.ENAMETOOLONG: "choose a shorter name (most file systems allow 255 bytes per name)",
        errno.EROFS: "the file system is read-only; choose a path on a writable disk",
    }
    fix = fixes.get(exc.errno, "check the path")
    return f"{name}: {exc.strerror or exc}; {fix}"


# OSError numbers that name a mistake in a path the user gave, not a bug
USER_OS_ERRORS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                  errno.ENAMETOOLONG, errno.EROFS)


def out_of_memory(exc: BaseException) -> UserError | None:
    """An allocation that did not fit (torch's OutOfMemoryError, a CPU "not enough memory") as a sentence."""
    text = str(exc)
    if not isinstance(exc, (RuntimeError, MemoryError)) or not (
            isinstance(exc, MemoryError) or "out of memory" in text.lower() or "not enough memory" in text.lower()):
        return None
    first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
    return UserError(f"out of memory ({first}); lower batch_syn or syn_steps, use --set memory=checkpoint, fewer "
                     "--workers, or a device with more free memory")


def is_user_error(exc: BaseException) -> bool:
    """UserError, and the built-in errors our own checks and the user's paths raise (ValueError, KeyError,
    a missing or unwritable path); anything else is a bug to report."""
    if isinstance(exc, (UserError, ValueError, KeyError)):
        return True
    return isinstance(exc, OSError) and exc.errno in USER_OS_ERRORS
