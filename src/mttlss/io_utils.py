"""Atomic file writing: a crash (even kill -9) never leaves a half-written file behind, Ctrl-C waits until the
file being written is in place, files get the umask's ordinary permissions, and a full disk is reported as such
(``mttlss.errors.DiskFullError``). ``StopRequest`` turns Ctrl-C into "stop after this step" for a loop that
checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from mttlss.errors import DiskFullError, is_disk_full


def file_mode() -> int:
    """The permissions the user's umask gives an ordinary new file (0o644 under umask 022).

    Why: ``tempfile.mkstemp`` creates its file 0600 whatever the umask, so without this every file written
    here (experts, checkpoints, artifacts) would be unreadable to the rest of a group sharing the folder.
    """
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it; put it back at once
    return 0o666 & ~mask


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only there can Python handle signals


def _deliver_sigint(handler: Any, frame: Any) -> None:
    """Act on a SIGINT that was held back, as ``handler`` (the one installed before) would have."""
    if callable(handler):
        handler(signal.SIGINT, frame)  # signal.default_int_handler raises KeyboardInterrupt
    elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt


@contextlib.contextmanager
def finish_before_interrupt():
    """Hold Ctrl-C (SIGINT) back until the block is done, then deliver it: a file being written is finished."""
    if not _in_main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        _deliver_sigint(previous, caught[-1])


class StopRequest:
    """Ctrl-C as a request to stop at the next safe point: the first SIGINT sets ``requested`` (a loop finishes its
    step, checkpoints and stops); a second one stops at once (KeyboardInterrupt). ``enabled=False`` (or outside the
    main thread, or where someone else already handles SIGINT) leaves Ctrl-C as it is."""

    def __init__(self, *, message: str, enabled: bool = True):
        self.message, self.enabled, self.requested = message, enabled, False
        self._previous: Any = None

    def __enter__(self) -> "StopRequest":
        if self.enabled and _in_main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(self.message, file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, fsync it, then rename it into place; Ctrl-C waits
    until the file is in place.

    A full disk raises ``DiskFullError`` (naming the folder); the file at ``path``, if any, is left as it was.
    """
    with finish_before_interrupt():
        return _write_then_rename(Path(path), write)


def _write_then_rename(path: Path, write: Callable[[str], None]) -> Path:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, file_mode())  # after the writer: some (safetensors) replace the file they are given
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a mix
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError) and is_disk_full(exc, path.parent):
            raise DiskFullError(path.parent, detail=_first_line(exc)) from exc
        raise
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (a log: a kill loses at most the line being written); a full disk raises
    ``DiskFullError``."""
    path = Path(path)
    try:
        with open(path, "a") as fh:
            fh.write(text)
    except OSError as exc:
        if is_disk_full(exc, path.parent):
            raise DiskFullError(path.parent, detail=_first_line(exc)) from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return _atomic(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors with safetensors (contiguous CPU copies), atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))
