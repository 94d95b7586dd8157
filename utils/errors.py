"""Errors a user can cause and fix: the entry points print them as one line and exit non-zero."""
from __future__ import annotations

import sys
from typing import Any, Callable


class UserError(Exception):
    """Base class of mistakes in input (config, data, checkpoints), not bugs."""


class ConfigError(UserError, ValueError):
    """Unknown config key, bad value, unknown head or dataset name."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run an entry point; a user mistake prints ``error: <one line>`` to stderr and returns 1."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
