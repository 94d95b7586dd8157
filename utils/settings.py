"""Config settings, declared next to the code that reads them.

A ``Setting`` is one flat config key (also a command-line flag of the same name): its default, a
help line, and what values it accepts. The core options (``utils/options.py``), every head
(``Head.settings``) and every batch-field builder declare theirs through ``declare``; the config
system collects them all, so adding a head never means editing the option list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """One config key. ``choices`` lists the allowed values; ``low``/``high`` bound a number (inclusive),
    ``above`` from below exclusively (``lr`` > 0)."""
    key: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    above: float | None = None
    item: type | None = None  # element type of a list whose default is empty

    @property
    def item_type(self) -> type:
        return self.item or type(self.default[0])

    @property
    def type_name(self) -> str:
        return type(self.default).__name__

    def coerce(self, value: Any) -> Any:
        """``value`` converted to the default's type and checked, or a ConfigError naming the key."""
        default = self.default
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, int):
                if isinstance(value, bool) or float(value) != int(value):
                    raise TypeError
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool):
                    raise TypeError
                value = float(value)
            elif isinstance(default, list):
                if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                    raise TypeError
                value = [self.item_type(v) for v in value]
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{self.key}' expects {self.type_name}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"config key '{self.key}' is '{value}'; valid: {', '.join(map(str, self.choices))}")
        self._check_range(value)
        return value

    def _check_range(self, value: Any) -> None:
        if self.above is not None and not value > self.above:
            raise ConfigError(f"{self.key} must be greater than {self.above:g}, got {value}")
        if self.low is None and self.high is None:
            return
        low = float("-inf") if self.low is None else self.low
        high = float("inf") if self.high is None else self.high
        if low <= value <= high:
            return
        if (self.low, self.high) == (0, 1):
            raise ConfigError(f"{self.key} is a probability (0 to 1), got {value}")
        if self.high is None:
            raise ConfigError(f"{self.key} must be at least {self.low}, got {value}")
        raise ConfigError(f"{self.key} must lie in [{low}, {high}], got {value}")

    def describe(self) -> str:
        """The help line with the default and the accepted values (for ``--help``)."""
        allowed = f"; one of {', '.join(map(str, self.choices))}" if self.choices else ""
        if self.above is not None:
            allowed += f"; greater than {self.above:g}"
        if self.low is not None or self.high is not None:
            allowed += f"; range [{'' if self.low is None else self.low}, {'' if self.high is None else self.high}]"
        return f"{self.help} (default {self.default!r}{allowed})"


PROBABILITY = {"low": 0.0, "high": 1.0}

# owner (e.g. "core", "head sdm", "field mlm_ids") -> its settings, in declaration order
_DECLARED: dict[str, tuple[Setting, ...]] = {}


def declare(owner: str, settings: tuple[Setting, ...]) -> None:
    """Register ``owner``'s settings. A key may be declared once; re-declaring the same owner replaces it."""
    taken = {s.key: name for name, group in _DECLARED.items() if name != owner for s in group}
    for setting in settings:
        if setting.key in taken:
            raise ConfigError(f"config key '{setting.key}' of {owner} is already declared by {taken[setting.key]}")
    _DECLARED[owner] = tuple(settings)


def withdraw(owner: str) -> None:
    """Forget ``owner``'s settings (a head unregistered, e.g. a plugin unloaded)."""
    _DECLARED.pop(owner, None)


def declared() -> dict[str, tuple[Setting, ...]]:
    """Every owner's settings, in declaration order."""
    return dict(_DECLARED)
