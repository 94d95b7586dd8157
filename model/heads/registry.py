"""Heads registered by their ``--loss_names`` token."""
from __future__ import annotations

from utils.errors import ConfigError

from .base import Head

HEADS: dict[str, type[Head]] = {}


def register_head(cls: type[Head]) -> type[Head]:
    if cls.name in HEADS:
        raise ConfigError(f"head '{cls.name}' registered twice")
    HEADS[cls.name] = cls
    return cls


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
