"""The plugin manager: built-in plugins, entry-point plugins, and what they register.

Design choices
- A pluggy ``PluginManager`` for the project ``sftctl``. Built-ins (``sftctl.plugins.*``) are
  registered first through the same hooks any plugin uses; third-party plugins come from the
  entry-point group ``sftctl`` (the entry-point name is the plugin name).
- Loading is controlled by environment variables, as pytest does:
  ``SFTCTL_PLUGINS=a,b`` loads only those third-party plugins;
  ``SFTCTL_DISABLE_PLUGIN_AUTOLOAD=1`` loads none unless named by ``SFTCTL_PLUGINS`` or
  ``--plugin``. Built-ins always load.
- Failures are named: a plugin that raises on import is reported with its entry point and
  distribution; ``check_pending`` turns a misspelled ``sftctl_*`` hook into an error that names
  the plugin and the hook.
- Registration hooks are called one implementation at a time, so every registered item is
  stamped with its plugin and a duplicate name is an error naming both plugins.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from .. import hookspecs
from ..hookspecs import hookimpl  # noqa: F401 (re-exported)
from .config import ConfigOption
from ..errors import PluginError
from ..data.formats import DatasetFormat
from ..training.optim import OptimizerSpec, SchedulerSpec
from .benchmarks import BenchmarkSpec

PROJECT = "sftctl"
ENTRY_POINT_GROUP = "sftctl"
ENV_PLUGINS = "SFTCTL_PLUGINS"
ENV_DISABLE_AUTOLOAD = "SFTCTL_DISABLE_PLUGIN_AUTOLOAD"


BUILTIN_PLUGINS = {
    "alpaca": "sftctl.plugins.alpaca",
    "optimizers": "sftctl.plugins.optimizers",
    "schedulers": "sftctl.plugins.schedulers",
    "metrics_jsonl": "sftctl.plugins.metrics_jsonl",
    "evals": "sftctl.evals.plugin",
}


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin", "entry point", "registered"
    module: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


class PluginManager(pluggy.PluginManager):
    """sftctl's plugin manager; use :func:`get_plugin_manager` to build a loaded one."""

    def __init__(self):
        super().__init__(PROJECT)
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.skipped_entry_points: list[str] = []  # installed but not loaded (env restriction)
        self._available_entry_points: dict[str, metadata.EntryPoint] = {}

    # ---------------------------------------------------------------------------------- loading

    def add_plugin(self, plugin: Any, name: str, source: str = "registered",
                   distribution: str | None = None, version: str | None = None) -> None:
        """Register a plugin object or module under ``name``; a taken name is an error."""
        if self.has_plugin(name):
            other = self.infos.get(name)
            raise PluginError(f"two plugins are named {name!r}: {other.module if other else '?'} "
                              f"and {getattr(plugin, '__name__', type(plugin).__name__)}")
        try:
            self.register(plugin, name=name)
        except ValueError as e:
            raise PluginError(f"cannot register plugin {name!r}: {e}") from None
        module = getattr(plugin, "__name__", type(plugin).__module__ + "." + type(plugin).__name__)
        self.infos[name] = PluginInfo(name, source, module, distribution, version)

    def load_builtins(self) -> None:
        for name, modname in BUILTIN_PLUGINS.items():
            try:
                module = importlib.import_module(modname)
            except Exception as e:  # a broken built-in is a bug, but still say which
                raise PluginError(f"built-in plugin {name!r} ({modname}) failed to import: "
                                  f"{type(e).__name__}: {e}") from e
            self.add_plugin(module, name, "builtin")

    def entry_points(self) -> dict[str, metadata.EntryPoint]:
        """Installed entry points of the group ``sftctl`` by name."""
        eps = {}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            eps.setdefault(ep.name, ep)
        return eps

    def load_entry_point_plugins(self, requested: list[str] | None = None) -> None:
        """Load third-party plugins, honouring the environment variables (see module doc).

        ``requested`` are names from ``--plugin``: loaded even when autoload is disabled.
        """
        requested = list(requested or [])
        eps = self.entry_points()
        self._available_entry_points = eps
        only = _env_list(ENV_PLUGINS)
        autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "") in ("", "0")
        for name in sorted(eps):
            ep = eps[name]
            wanted = name in requested or (only is not None and name in only) or \
                (only is None and autoload)
            if not wanted:
                self.skipped_entry_points.append(name)
                continue
            if self.has_plugin(name):
                if name in BUILTIN_PLUGINS:
                    dist = ep.dist.name if ep.dist else "?"
                    raise PluginError(f"entry point {name!r} ({ep.value}, distribution {dist}) "
                                      f"clashes with the built-in plugin {name!r}")
                continue
            try:
                plugin = ep.load()
            except Exception as e:
                dist = f", distribution {ep.dist.name} {ep.dist.version}" if ep.dist else ""
                raise PluginError(f"plugin {name!r} (entry point {ep.value}{dist}) failed to "
                                  f"import: {type(e).__name__}: {e}") from e
            self.add_plugin(plugin, name, "entry point",
                            ep.dist.name if ep.dist else None, ep.dist.version if ep.dist else None)
        if only is not None:
            missing = [n for n in only if n not in eps and n not in BUILTIN_PLUGINS]
            if missing:
                raise PluginError(f"{ENV_PLUGINS} names plugins that are not installed: "
                                  f"{', '.join(missing)}; installed: "
                                  f"{', '.join(sorted(eps)) or 'none'}")

    def check(self) -> None:
        """``check_pending`` with an error that names the plugin and the unknown hook."""
        try:
            self.check_pending()
        except pluggy.PluginValidationError as e:
            name = self.get_name(e.plugin) or repr(e.plugin)
            unknown = [n for n in self.hook_names(specified=False)
                       if getattr(self.hook, n).spec is None and
                       any(i.plugin is e.plugin for i in getattr(self.hook, n).get_hookimpls())]
            raise PluginError(f"plugin {name!r} implements unknown hook(s) "
                              f"{', '.join(unknown) or '?'} ({e}); the hooks are: "
                              f"{', '.join(self.hook_names())}") from None
        for name, info in self.infos.items():
            plugin = self.get_plugin(name)
            info.hooks = sorted(impl_name for impl_name in self.hook_names()
                                if any(i.plugin is plugin for i in
                                       getattr(self.hook, impl_name).get_hookimpls()))

    def hook_names(self, specified: bool = True) -> list[str]:
        """Names of the ``sftctl_*`` hooks (only those with a spec unless ``specified=False``)."""
        return sorted(n for n in dir(self.hook) if n.startswith("sftctl_") and
                      (not specified or getattr(self.hook, n).spec is not None))

    def require(self, names: list[str]) -> None:
        """Every ``--plugin`` name must be loaded; an unknown one lists the available names."""
        for name in names:
            if not self.has_plugin(name):
                avail = sorted(set(self.infos) | set(self._available_entry_points))
                raise PluginError(f"unknown plugin {name!r}; available: {', '.join(avail)}")

    # ----------------------------------------------------------------------------- registries

    def _collect(self, hook_name: str, kind: str, cls, extra: dict | None = None) -> dict:
        """Call each implementation of a registration hook with its own ``register``."""
        items: dict[str, Any] = {}
        hook = getattr(self.hook, hook_name)
        # pluggy calls implementations last-registered first; keep registration order instead
        for impl in hook.get_hookimpls():
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue
            plugin_name = impl.plugin_name

            def register(item, _plugin=plugin_name):
                if not isinstance(item, cls):
                    raise PluginError(f"plugin {_plugin!r}: {hook_name} registered "
                                      f"{type(item).__name__}, expected {cls.__name__}")
                if item.name in items:
                    raise PluginError(f"{kind} {item.name!r} is registered twice: by plugin "
                                      f"{items[item.name].plugin!r} and by plugin {_plugin!r}")
                items[item.name] = dataclasses.replace(item, plugin=_plugin)

            kwargs = {"register": register, **(extra or {})}
            impl.function(**{a: kwargs[a] for a in impl.argnames})
        return items

    def dataset_formats(self) -> dict[str, DatasetFormat]:
        return self._collect("sftctl_register_dataset_formats", "dataset format", DatasetFormat)

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return self._collect("sftctl_register_optimizers", "optimizer", OptimizerSpec)

    def schedulers(self) -> dict[str, SchedulerSpec]:
        return self._collect("sftctl_register_schedulers", "scheduler", SchedulerSpec)

    def benchmarks(self, config) -> dict:
        """Benchmarks (``sftctl.BenchmarkSpec``) registered for this run config."""
        return self._collect("sftctl_register_benchmarks", "benchmark", BenchmarkSpec,
                             {"config": config})

    def config_options(self) -> dict[str, ConfigOption]:
        return self._collect("sftctl_add_options", "option", ConfigOption)

    def run_benchmarks(self, config) -> list[BenchmarkSpec]:
        """The benchmarks a training run records in summary.json (run after training by the
        ``sftctl_post_train`` hooks): ``eval.tasks`` when given (a name no plugin registers is a
        standard lm-eval task), else those registered by the plugins the run enables."""
        registered = self.benchmarks(config)
        wanted = config.eval.tasks
        if wanted:
            return [registered[t] if t in registered else BenchmarkSpec(name=t) for t in wanted]
        return [b for b in registered.values() if b.plugin in config.plugins]

    def formats_of(self, plugin_name: str) -> list[str]:
        return [n for n, f in self.dataset_formats().items() if f.plugin == plugin_name]

    def call_lifecycle(self, hook_name: str, **kwargs) -> list:
        return getattr(self.hook, hook_name)(**kwargs)

    def describe(self, config=None) -> list[dict]:
        """Plugins with what they registered (``sftctl plugins``)."""
        formats, opts, scheds = self.dataset_formats(), self.optimizers(), self.schedulers()
        options = self.config_options()
        benches = self.benchmarks(config) if config is not None else {}
        out = []
        for name, info in self.infos.items():
            out.append({
                "name": name, "source": info.source, "module": info.module,
                "distribution": info.distribution, "version": info.version,
                "hooks": info.hooks,
                "dataset_formats": sorted(k for k, v in formats.items() if v.plugin == name),
                "optimizers": sorted(k for k, v in opts.items() if v.plugin == name),
                "schedulers": sorted(k for k, v in scheds.items() if v.plugin == name),
                "benchmarks": sorted(k for k, v in benches.items() if v.plugin == name),
                "options": sorted(k for k, v in options.items() if v.plugin == name),
            })
        return out


def get_plugin_manager(requested: list[str] | None = None, *, entry_points: bool = True,
                       extra: list[tuple[str, Any]] | None = None) -> PluginManager:
    """Build a plugin manager with the built-ins, entry-point plugins and ``extra`` objects.

    ``extra``: ``(name, plugin)`` pairs registered after the built-ins (tests use this for
    temporary plugins).
    """
    pm = PluginManager()
    pm.load_builtins()
    for name, plugin in extra or []:
        pm.add_plugin(plugin, name, "registered")
    if entry_points:
        pm.load_entry_point_plugins(requested)
    pm.check()
    return pm

