"""Experiment trackers: what a tracker plugin registers (``TrackerSpec``) and how ``--report-to``
is checked against what is registered.

Design choices
- A tracker is a plugin like any other: it registers a ``TrackerSpec`` through
  ``sftctl_register_trackers`` (so ``--report-to`` knows its name, the package it needs and the
  extra that installs it) and writes through the lifecycle hooks. The built-ins are
  ``tensorboard``, ``wandb`` and ``mlflow`` (``sftctl.plugins.trackers``); a third-party plugin
  registering ``TrackerSpec("neptune", ...)`` joins ``--report-to`` the same way.
- ``train.report_to`` is a list; each item may hold several names separated by commas
  (``--report-to tensorboard,wandb`` as in Hugging Face's ``TrainingArguments``); ``none``
  means no tracker. Nothing is on by default: a tracker that writes (or uploads) where the user
  did not ask would be a surprise.
- Checked before the data and the model load (``check_report_to``): an unknown name is a
  ``ConfigError`` listing the registered ones, a tracker whose package is not importable is a
  ``ConfigError`` naming the extra to install (``pip install "sftctl[trackers]"``). The check
  looks for the package without importing it (``importlib.util.find_spec``): importing wandb or
  mlflow takes seconds and is left to the tracker, on rank 0 only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class TrackerSpec:
    """An experiment tracker a plugin adds (registered through ``sftctl_register_trackers``).

    ``name``: what ``--report-to`` selects; ``requires``: the importable modules it needs;
    ``extra``: the sftctl extra that installs them (named in the error when one is missing);
    ``install``: the pip requirement otherwise (a third-party tracker's own package)."""

    name: str
    description: str = ""
    requires: tuple[str, ...] = ()
    extra: str | None = None
    install: str | None = None
    plugin: str | None = None


def selected_trackers(config) -> list[str]:
    """The tracker names of ``train.report_to`` (comma-separated items split, ``none`` and
    duplicates dropped), in the order given."""
    out: list[str] = []
    for item in config.train.report_to or []:
        for name in str(item).split(","):
            name = name.strip()
            if name and name.lower() != "none" and name not in out:
                out.append(name)
    return out


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return True


def check_report_to(config, trackers: dict[str, TrackerSpec]) -> list[TrackerSpec]:
    """The registered trackers ``train.report_to`` selects; a ``ConfigError`` for an unknown
    name (listing the registered ones) or a tracker whose package is not installed (naming the
    extra or package to install)."""
    out = []
    for name in selected_trackers(config):
        if name not in trackers:
            known = ", ".join(sorted(trackers)) or "none registered"
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; known trackers: "
                              f"{known} (or 'none')")
        spec = trackers[name]
        missing = [m for m in spec.requires if _missing(m)]
        if missing:
            how = (f'pip install "sftctl[{spec.extra}]"' if spec.extra else
                   f"pip install {spec.install or ' '.join(missing)}")
            raise ConfigError(f"train.report_to: the {name} tracker needs the package "
                              f"{', '.join(missing)}, which is not installed: {how}")
        out.append(spec)
    return out
