"""Errors for bad input: each names the flag (or file and line) and says how to fix it."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable


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


class RoleCheckError(RuntimeError):
    """A judge or rewriter failed its start-up self-check (``roles/self_check.py``); the message
    names the cause. Entry points print it and exit 1 before any training step."""


def exits_on_bad_input(main: Callable) -> Callable:
    """Entry-point decorator: bad input found after the flags were parsed (a missing data file, a
    truncated index, a garbage checkpoint tracker, a tokenizer file of the wrong kind) raises
    :class:`ConfigError` naming the file and the fix; it is printed like a flag error and the
    process exits 2, without a traceback. Bad input is not a crash."""

    @functools.wraps(main)
    def entry_point(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ConfigError as error:
            program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "megatron-sip"
            print(f"{program}: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)
        except RoleCheckError as error:
            program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "megatron-sip"
            print(f"{program}: error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)

    return entry_point
