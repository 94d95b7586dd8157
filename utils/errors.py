"""Errors a user can cause and fix: the entry points print them as one line and exit non-zero."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Iterator

from .comm import end_distributed


class UserError(Exception):
    """Base class of mistakes in input (config, data, checkpoints), not bugs."""


class ConfigError(UserError, ValueError):
    """Unknown config key, bad value, unknown head or dataset name."""


class WriteError(UserError):
    """A file could not be written (disk full, quota, read-only); the previous version is intact."""


class Interrupted(UserError):
    """Ctrl-C or SIGTERM; the message says what was saved and how to continue."""
    exit_code = 130


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM (e.g. a scheduler ending the job) stops the program as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block Ctrl-C and SIGTERM wait: a file being written is finished first, then the
    interruption is raised (as KeyboardInterrupt). Without this a signal inside ``torch.save``
    breaks its zip writer with a RuntimeError instead of a clean stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run an entry point; a user mistake prints ``error: <one line>`` to stderr and returns 1.
    Under torchrun the process group is left before returning."""
    finished = False
    try:
        main(argv)
        finished = True
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    finally:
        end_distributed(wait=finished)
    return 0
