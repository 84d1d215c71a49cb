"""Built-in plugin ``evals``: how the evaluation package plugs into the core, through hooks only.

- ``sftctl_add_commands``: ``sftctl eval`` and ``sftctl report``.
- ``sftctl_post_train``: after ``sftctl train``, benchmark the base model and the SFT checkpoint
  with lm-eval and write the report (``runner.run_post_train``).
- ``sftctl_configure``, ``sftctl_train_start``, ``sftctl_checkpoint_saved``: evaluation that
  steers the run (``--benchmark-every``, ``--select-best``, ``--require``; ``steering.py``).

The core never imports ``sftctl.evals``; this module is loaded by the plugin manager like any
other plugin, and imports lm-eval and matplotlib only when a hook runs.
"""

from __future__ import annotations

from sftctl import hookimpl


@hookimpl
def sftctl_add_commands(subparsers, options):
    from .cli import add_eval_parser, add_report_parser

    add_eval_parser(subparsers, options)
    add_report_parser(subparsers)


@hookimpl
def sftctl_post_train(run_dir, config, pm):
    from .runner import run_post_train

    return run_post_train(run_dir, config, pm)


@hookimpl
def sftctl_configure(config, pm):
    from .steering import configure

    configure(config, pm)


@hookimpl
def sftctl_train_start(run):
    from .steering import train_start

    train_start(run)


@hookimpl
def sftctl_checkpoint_saved(run, step, path):
    from .steering import checkpoint_saved

    checkpoint_saved(run, step, path)
