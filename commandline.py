"""How every command of the project fails: one ``error:`` line, an exit status that says whose fault it was.

A command raises ``UsageError`` for what the user asked wrongly (a missing file, an unknown config key,
options that contradict each other: exit 2, as argparse does) and ``CommandError`` for a run that could
not be done (exit 1). ``run_command`` prints either as one line on stderr, with no traceback unless
``MRCNN_DEBUG`` is set; any other exception is a bug of ours and keeps its traceback. Torch-free, so the
service's client uses it too.

``ArgumentParser`` makes argparse's own refusals UsageErrors too, and the ``type=`` checks below refuse a
path before any work starts (an export that fails on its ``--out`` after minutes of work wastes them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

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


class Interrupted(CommandError):
    """Ctrl-C, reported with what was kept (``interrupted after 37 of 500 images; partial results in X``).
    Exit status 130, as a shell reports Ctrl-C."""

    exit_status = EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusals (a missing option, a bad value, a ``type=`` check below) are
    UsageErrors: run_command's one ``error:`` line naming the option, instead of the usage text that
    ``--help`` prints anyway."""

    def error(self, message: str) -> NoReturn:
        # "--out: PATH: ..." as the commands' own refusals say it, not argparse's "argument --out: ..."
        raise UsageError(f"{message.removeprefix('argument ')} (see {self.prog} --help)")


def existing_file(text: str) -> Path:
    """argparse type: a path naming a file."""
    return _existing(Path(text), folder=False)


def existing_folder(text: str) -> Path:
    """argparse type: a path naming a folder."""
    return _existing(Path(text), folder=True)


def _existing(path: Path, folder: bool) -> Path:
    """``path`` when it names a folder (``folder``) or a file, else the refusal saying what it is."""
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if path.is_dir() if folder else path.is_file():
        return path
    found = f"a {other}, expected a {kind}" if path.exists() else f"no such {kind}"
    raise argparse.ArgumentTypeError(f"{path}: {found}")


def output_file(text: str) -> Path:
    """argparse type: a file to write (replaced if it exists), whose folder exists or can be made."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a folder, expected a file name to write")
    _check_can_create(path.parent)
    return path


def output_folder(text: str) -> Path:
    """argparse type: a folder to write in, existing or that can be made."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a file, expected a folder to write in")
    _check_can_create(path)
    return path


def _check_can_create(folder: Path) -> None:
    """The nearest existing ancestor of ``folder`` (itself included) is a folder we may write in."""
    folder = folder.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing}: a file, not a folder to write in")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{existing}: no permission to write in it")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number >= 1")
    return value


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
