"""Errors a user can cause and fix: the entry points print them as one line and exit non-zero."""


class UserError(Exception):
    """Base class of mistakes in input (config, data, checkpoints), not bugs."""


class ConfigError(UserError, ValueError):
    """Unknown config key, bad value, unknown head or dataset name."""
