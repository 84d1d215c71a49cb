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
    # set by the plugin manager when a plugin's hook raised this error on purpose (e.g. a
    # ConfigError from sftctl_configure): the CLI names the plugin next to the message
    plugin: str | None = None
    hook: str | None = None


class ConfigError(SftctlError):
    """A config file, key, value or command-line option is invalid."""

    exit_code = 2


class DataError(SftctlError):
    """A dataset cannot be loaded or one of its records is invalid."""

    exit_code = 2


class PluginError(SftctlError):
    """A plugin failed to load, is unknown, or registered something twice."""

    exit_code = 2


class PluginHookError(PluginError):
    """A plugin's code raised an unexpected exception: a bug in the plugin, not in the input.

    ``plugin``: the plugin's name; ``hook``: the hook (or format function, command) it was in;
    ``error``: the original exception, also chained as ``__cause__`` so the traceback survives.
    Exit 2 when it happens before training starts; the plugin manager passes ``exit_code=1``
    for the hooks called once training has started.
    """

    def __init__(self, plugin: str | None, hook: str, error: BaseException, *,
                 where: str = "", exit_code: int = 2, hint: str = ""):
        self.plugin, self.hook, self.error = plugin, hook, error
        self.exit_code = exit_code
        super().__init__(f"plugin {plugin!r} failed in {hook}{where}: "
                         f"{type(error).__name__}: {error}{hint}")


class ModelError(SftctlError):
    """The model or tokenizer cannot be loaded or is unusable for SFT."""

    exit_code = 2


class TrainingError(SftctlError):
    """Training stopped (non-finite loss, failed save ...)."""

    exit_code = 1
