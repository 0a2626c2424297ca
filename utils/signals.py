"""SIGINT (Ctrl-C) and SIGTERM (kill, timeout, Slurm, Ray) stop a run the same way, and wait
while it writes what it keeps."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_held = 0                       # depth of the stop_signals_held blocks being run
_pending: int | None = None     # the first stop signal that arrived while they ran
_received: int | None = None    # the first stop signal raised: a library's bare `except:` may swallow it


class Stopped(KeyboardInterrupt):
    """A stop signal arrived: a KeyboardInterrupt, so that Ctrl-C and SIGTERM take one path."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    global _pending, _received
    if _held:
        _pending = _pending or signum
    else:
        _received = _received or signum
        raise Stopped(signum)


def raise_if_stopped() -> None:
    """Raise Stopped if a stop signal was raised and something swallowed it (some imports run
    code under a bare `except:`), so that the run stops at the next check all the same."""
    if _received is not None:
        raise Stopped(_received)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise Stopped (SIGTERM would otherwise end the process
    at once: no message, no closing line in train.log). Python sets handlers in its main thread
    only; elsewhere nothing changes."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs, then raise Stopped for the first that
    came: a checkpoint or a metrics line is written whole (torch.save stopped midway ends in a
    traceback, and a metrics line cut short in a file --resume cannot read)."""
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        signum = _pending if not _held else None
        if not _held:
            _pending = None
    if signum is not None:
        raise Stopped(signum)
