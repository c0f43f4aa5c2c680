"""`python -m mttlss` and the `mttlss` command: the command line, with Ctrl-C handled from its first moment.

Why a launcher apart from cli.py: importing the CLI imports torch and every stage (about 2-3 s on a CPU). A Ctrl-C
in that window, or while Python shuts down after the command finished, used to end the process by the signal
itself (exit -2, a traceback or nothing) instead of the sentence and exit 130 (measured by
scripts/fault_injection.py). Here only the standard library is imported before the try.
"""

from __future__ import annotations

import os
import signal
import sys

from mttlss.errors import DEBUG_ENV, EXIT_INTERRUPTED, INTERRUPTED
from mttlss.runtime import exec_with_allocator


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or DEBUG_ENV in os.environ
    try:
        from mttlss.cli import main as cli_main  # the heavy imports: torch and every stage

        code = cli_main(argv)  # Ctrl-C during a command is handled there (it knows the command's name)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mttlss: {INTERRUPTED}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    return code


def run() -> None:
    """The process entry (the `mttlss` script, `python -m mttlss`): run the command line, then exit with its code."""
    code = main()
    # The command is over and its files are whole. While Python shuts down it restores the default SIGINT
    # action, under which a Ctrl-C would kill the finished process by the signal (exit -2); ignore it instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == EXIT_INTERRUPTED:
        # Python ends a process by SIGINT itself (exit -2) when it believes a KeyboardInterrupt went unhandled,
        # even after the command caught it and said so: seen in 3 of 60 interrupted runs (scripts/fault_injection.py,
        # 2026-12-01), the sentence printed and then exit -2. The command has closed its files and logs; leave
        # now, with the status it chose.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def entry() -> None:
    """The `mttlss` script and `python -m mttlss`: first re-execute with a faster allocator preloaded where one is
    installed (runtime.py: tcmalloc or jemalloc; ``MTTLSS_ALLOCATOR=system`` switches it off), then run.

    The exec starts a second interpreter: a Ctrl-C in the few milliseconds before it reaches this function ends
    the process by the signal (exit -2) rather than with the sentence and exit 130, as during any start-up."""
    try:
        exec_with_allocator()  # returns where nothing is to be preloaded or it already is
    except KeyboardInterrupt:
        print(f"mttlss: {INTERRUPTED}", file=sys.stderr)
        os._exit(EXIT_INTERRUPTED)
    run()


if __name__ == "__main__":
    entry()
