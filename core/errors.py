"""Errors that sftctl reports to the user as a message, not a traceback.

Design choices
- One base class, ``SftctlError``, so the CLI can tell "the user's input is wrong" (print the
  message, exit non-zero) from a bug (let the traceback through).
- Each subclass carries an exit code; the CLI maps the exception to that code. Input problems
  (config, data, plugins, model path) exit with 2, like argparse's usage errors, and happen
  before any training step, so no checkpoint is ever written for them.
"""

from __future__ import annotations


class SftctlError(Exception):
    """An error the user can fix; its message names the file, record and field involved."""

    exit_code = 1


class ConfigError(SftctlError):
    """A config file, key, value or command-line option is invalid."""

    exit_code = 2


class DataError(SftctlError):
    """A dataset cannot be loaded or one of its records is invalid."""

    exit_code = 2


class PluginError(SftctlError):
    """A plugin failed to load, is unknown, or registered something twice."""

    exit_code = 2


class ModelError(SftctlError):
    """The model or tokenizer cannot be loaded or is unusable for SFT."""

    exit_code = 2


class TrainingError(SftctlError):
    """Training stopped (non-finite loss, failed save ...)."""

    exit_code = 1
