"""How every command of the project fails: one ``error:`` line, an exit status that says whose fault it was.

A command raises ``UsageError`` for what the user asked wrongly (a missing file, an unknown config key,
options that contradict each other: exit 2, as argparse does) and ``CommandError`` for a run that could
not be done (exit 1). ``run_command`` prints either as one line on stderr, with no traceback unless
``MRCNN_DEBUG`` is set; any other exception is a bug of ours and keeps its traceback. Torch-free, so the
service's client uses it too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

DEBUG_VARIABLE = "MRCNN_DEBUG"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class CommandError(Exception):
    """A run that could not be done; the message is one line naming what failed. Exit status 1."""

    exit_status = EXIT_FAILURE


class UsageError(CommandError):
    """A request the command cannot take (bad path, key or combination); the message says what was
    expected. Exit status 2."""

    exit_status = EXIT_USAGE


def debugging() -> bool:
    """True when ``MRCNN_DEBUG`` asks for tracebacks of user errors too."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def run_command(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)`` and turn its user errors into one ``error:`` line and an exit status."""
    try:
        return main(argv) or 0
    except CommandError as exc:
        if debugging():
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        if debugging():
            raise
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
