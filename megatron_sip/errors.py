"""Errors for bad input: each names the flag (or file and line) and says how to fix it."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A setting is invalid. ``flag`` is the command-line flag that sets it."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}")


def require_choice(flag: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(flag, f"unknown value {value!r}; choose one of {', '.join(choices)}")


def require_positive(flag: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(flag, f"must be a positive number, got {value!r}")
