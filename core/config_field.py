"""One config field: default, help text, command-line flag and allowed range, in one place.

Design choice: every component declares its own typed config dataclass with these fields
(``sftctl.data.config``, ``sftctl.training.config``); ``sftctl.run.config`` assembles them into
the run config and generates the command line from the metadata, so ``--help``, YAML keys and
flags cannot drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Callable


def config_field(default=dataclasses.MISSING, *, help: str, flag: str | None = None,
       choices: tuple | None = None, minimum: float | None = None, maximum: float | None = None,
       below: float | None = None, factory: Callable | None = None, metavar: str | None = None,
       cli: str = "value"):
    """A config field with its documentation and CLI flag.

    ``cli`` says how the flag behaves: "value" (takes a value), "bool" (--x / --no-x),
    "store_true", "store_false", "append" (repeatable, builds a list), "nargs" (one or more values).
    ``minimum``/``maximum`` are inclusive bounds, ``below`` an exclusive upper bound.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "minimum": minimum,
            "maximum": maximum, "below": below, "metavar": metavar, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
