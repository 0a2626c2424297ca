"""Errors a user can cause. The entry points print them as one line and exit with status 2."""
from __future__ import annotations

import argparse
import os
import sys


class UserError(Exception):
    """Bad input from the user: paths, data, flags, checkpoints."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def stdout_gone() -> None:
    """Whatever read stdout went away (`| head`, a closed terminal): point stdout at nowhere, so
    that later writes, and Python's flush at exit, have nothing to fail on."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
