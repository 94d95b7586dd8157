"""Heads registered by their ``--loss_names`` token."""
from __future__ import annotations

from utils.errors import ConfigError
from utils.settings import declare, withdraw

from .base import Head

HEADS: dict[str, type[Head]] = {}


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: the head answers to its ``name`` token; its settings join the config."""
    if cls.name in HEADS:
        raise ConfigError(f"head '{cls.name}' registered twice")
    declare(f"head {cls.name}", cls.settings)
    HEADS[cls.name] = cls
    return cls


def unregister_head(name: str) -> None:
    """Remove a head and its settings (heads defined outside the package, e.g. in tests)."""
    HEADS.pop(name)
    withdraw(f"head {name}")


def parse_loss_names(loss_names: str) -> list[str]:
    """Split 'sdm+mlm+id' into whole tokens; an unknown token is an error listing the known ones."""
    tokens = [t.strip() for t in loss_names.split("+") if t.strip()]
    if not tokens:
        raise ConfigError("loss_names is empty; known heads: " + ", ".join(sorted(HEADS)))
    for token in tokens:
        if token not in HEADS:
            raise ConfigError(f"unknown loss name '{token}' in loss_names '{loss_names}'; "
                             f"known: {', '.join(sorted(HEADS))}")
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"loss_names '{loss_names}' repeats a head")
    return tokens


def with_required(names: list[str]) -> list[str]:
    """``names`` plus every head they require (recursively), each required head before its users."""
    ordered: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ConfigError(f"heads require each other in a circle: {' -> '.join(chain + (name,))}")
        if name in ordered:
            return
        if name not in HEADS:
            raise ConfigError(f"head '{chain[-1]}' requires the unknown head '{name}'")
        for required in HEADS[name].requires:
            visit(required, chain + (name,))
        ordered.append(name)

    for name in names:
        visit(name, ())
    return ordered
