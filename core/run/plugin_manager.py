"""The plugin manager: built-in plugins, entry-point plugins, and what they register.

Design choices
- A pluggy ``PluginManager`` for the project ``sftctl``. Built-ins (``sftctl.plugins.*``) are
  registered first through the same hooks any plugin uses; third-party plugins come from the
  entry-point group ``sftctl`` (the entry-point name is the plugin name).
- Loading is controlled by environment variables, as pytest does:
  ``SFTCTL_PLUGINS=a,b`` loads only those third-party plugins;
  ``SFTCTL_DISABLE_PLUGIN_AUTOLOAD=1`` loads none unless named by ``SFTCTL_PLUGINS`` or
  ``--plugin``. Built-ins always load.
- Every hook implementation is wrapped when its plugin is registered (``HookImpl.function``,
  generators of ``wrapper=True``/``hookwrapper=True`` implementations included) so that an
  exception escaping it is marked with the plugin and the hook, then re-raised unchanged: a
  wrapper around it still catches the type the plugin raised, and an exception passing through
  a wrapper keeps the name of the plugin that raised it. Where the hook call returns to sftctl
  (hook-call monitoring, i.e. every ``pm.hook.*`` call, historic replays included, and
  ``call_impl``), a marked exception becomes ``PluginHookError`` chained to the original (whose
  traceback ``sftctl --debug`` prints); an ``SftctlError`` the plugin raised on purpose
  (``ConfigError`` from ``sftctl_configure``) keeps its type, message and exit code and is
  stamped with the plugin and hook. Exit 2 for a failure before training starts (registration,
  configuration, data, ``sftctl_train_start``), 1 for the hooks of a started run
  (``TRAINING_HOOKS``) and for a plugin's subcommand.
- A third-party plugin that cannot be loaded (its import raises, pluggy refuses it, or it
  implements an unknown hook, e.g. ``sftctl_stepend``) is *broken*: it is not registered and is
  kept in ``broken`` with its error. Like pytest, and unlike llm (which warns and goes on), a
  run does not start with a broken plugin installed, even one it did not ask for: every loaded
  plugin's lifecycle hooks take part in a run, so silently missing one (a logger, a checkpoint
  uploader) would be found out hours later. The CLI still answers ``--help``, ``plugins`` and
  ``doctor`` (they list the broken plugin and its error), and the message names the ways out,
  ``SFTCTL_PLUGINS`` and ``SFTCTL_DISABLE_PLUGIN_AUTOLOAD``. ``get_plugin_manager`` raises the
  same error unless ``strict=False``.
- Registration hooks are called one implementation at a time, so every registered item is
  stamped with its plugin and a duplicate name is an error naming both plugins.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from .. import hookspecs
from ..hookspecs import hookimpl  # noqa: F401 (re-exported)
from .config import ConfigOption
from ..errors import ConfigError, PluginError, PluginHookError, SftctlError
from ..data.formats import DatasetFormat
from ..training.optim import OptimizerSpec, SchedulerSpec
from ..training.trackers import TrackerSpec
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
    "chat": "sftctl.plugins.chat",
    "lora": "sftctl.plugins.lora",
    "evals": "sftctl.evals.plugin",
    # after evals: their sftctl_post_train is trylast (reads the report evals writes)
    "tensorboard": "sftctl.plugins.trackers.tensorboard",
    "wandb": "sftctl.plugins.trackers.wandb",
    "mlflow": "sftctl.plugins.trackers.mlflow",
    "model_card": "sftctl.plugins.model_card",
}


# hooks called once training has started: a plugin failing there exits 1 (a run was under way);
# every other hook runs before the first step, so its failure is an input-time error (exit 2)
TRAINING_HOOKS = frozenset({"sftctl_step_end", "sftctl_evaluate", "sftctl_checkpoint_saved",
                            "sftctl_save_model",
                            "sftctl_save",
                            "sftctl_after_train", "sftctl_post_train", "sftctl_report_sections"})

WAYS_OUT = (f"to run without it, name the plugins to load with {ENV_PLUGINS}=a,b or set "
            f"{ENV_DISABLE_AUTOLOAD}=1 (then only --plugin names load)")


_ORIGIN = "_sftctl_plugin_hook"  # (plugin, hook) set on an exception by the innermost guard


def _mark(e: BaseException, plugin: str, hook: str) -> None:
    """Remember where ``e`` escaped a plugin; the innermost guard wins, so an exception that
    passes through a wrapper keeps the name of the implementation that raised it."""
    if isinstance(e, Exception) and getattr(e, _ORIGIN, None) is None:
        try:
            setattr(e, _ORIGIN, (plugin, hook))
        except AttributeError:  # an exception type that refuses attributes: left unnamed
            pass


def plugin_failure(e: BaseException) -> BaseException:
    """What the caller of a hook raises for ``e``: an ``SftctlError`` stamped with its plugin
    and hook (raised on purpose), a ``PluginHookError`` for any other exception a plugin raised,
    ``e`` itself when no plugin raised it."""
    origin = getattr(e, _ORIGIN, None)
    if origin is None or isinstance(e, PluginHookError):
        return e
    plugin, hook = origin
    if isinstance(e, SftctlError):
        if e.plugin is None:
            e.plugin, e.hook = plugin, hook
        return e
    err = PluginHookError(plugin, hook, e, exit_code=1 if hook in TRAINING_HOOKS else 2)
    err.__cause__ = e
    return err


def guard(function, plugin: str, hook: str, *, generator: bool = False):
    """``function`` marking what it raises with ``plugin`` and ``hook`` (see module doc).

    The exception itself is re-raised unchanged, so wrapper implementations and pluggy see the
    type the plugin raised; the hook call's boundary (``plugin_failure``) turns it into the
    named error. ``generator``: a wrapper implementation, which pluggy drives with ``next``,
    ``send`` and ``throw``.
    """
    if getattr(function, "_sftctl_guarded", False):
        return function

    if not generator:
        @functools.wraps(function)
        def call(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except BaseException as e:
                _mark(e, plugin, hook)
                raise
    else:
        def wrapfail(what):
            e = RuntimeError(f"the wrapper {what}")
            _mark(e, plugin, hook)
            return e

        @functools.wraps(function)
        def call(*args, **kwargs):
            gen = function(*args, **kwargs)
            yielded, thrown = False, None
            try:
                next(gen)
                yielded = True
                try:
                    sent = yield
                except GeneratorExit:
                    gen.close()
                    raise
                except BaseException as e:  # another implementation's failure
                    thrown = e
                    gen.throw(e)
                else:
                    gen.send(sent)
            except StopIteration as stop:
                if not yielded:
                    raise wrapfail("returned without yielding") from None
                return stop.value
            except GeneratorExit:
                raise
            except BaseException as e:
                if e is not thrown:  # its own failure, not one passing through
                    _mark(e, plugin, hook)
                raise
            gen.close()
            raise wrapfail("yielded twice")

    call._sftctl_guarded = True
    return call


def _command(func, plugin: str, name: str):
    """A plugin's subcommand: what it raises names the plugin (exit 1: it was running)."""
    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as e:
            if isinstance(e, SftctlError):
                if e.plugin is None:
                    e.plugin, e.hook = plugin, f"command {name!r}"
                raise
            raise PluginHookError(plugin, f"command {name!r}", e, exit_code=1) from e
    return run


@dataclass
class BrokenPlugin:
    """A third-party plugin that could not be loaded (see module doc)."""

    name: str
    where: str  # "entry point mod:obj, distribution d 1.0" or "module m"
    problem: str  # "failed to import", "cannot be registered", "implements unknown hook(s) x"
    error: BaseException

    def error_text(self) -> str:
        e = self.error
        return str(e) if isinstance(e, SftctlError) else f"{type(e).__name__}: {e}"

    def describe(self) -> str:
        return f"plugin {self.name!r} {self.problem} ({self.where}): {self.error_text()}"

    def to_dict(self) -> dict:
        return {"name": self.name, "where": self.where, "problem": self.problem,
                "error": self.error_text()}


def _ep_where(ep) -> str:
    dist = f", distribution {ep.dist.name} {ep.dist.version}" if ep.dist else ""
    return f"entry point {ep.value}{dist}"


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
        self.add_hookcall_monitoring(lambda *a: None, self._name_failure)
        self.infos: dict[str, PluginInfo] = {}
        self.skipped_entry_points: list[str] = []  # installed but not loaded (env restriction)
        self.broken: dict[str, BrokenPlugin] = {}  # installed, asked for, but not loadable
        self._available_entry_points: dict[str, metadata.EntryPoint] = {}

    # ------------------------------------------------------------------------ guarding hooks

    def _guard_impl(self, hook_name: str, impl) -> None:
        impl.function = guard(impl.function, impl.plugin_name, hook_name,
                              generator=bool(impl.hookwrapper or impl.wrapper))

    @staticmethod
    def _name_failure(outcome, *_):
        # hook-call monitoring: the boundary of every pm.hook.* call (historic replays too)
        e = outcome.exception
        if e is not None and (new := plugin_failure(e)) is not e:
            outcome.force_exception(new)

    def call_impl(self, impl, **kwargs):
        """Call one implementation directly (registration hooks are called one at a time),
        with the same naming of failures as a hook call."""
        try:
            return impl.function(**{a: kwargs[a] for a in impl.argnames})
        except Exception as e:
            new = plugin_failure(e)
            if new is e:
                raise
            raise new from e

    def _verify_hook(self, hook, hookimpl) -> None:
        # pluggy calls this for each implementation of a specified hook while registering,
        # before replaying a historic call (sftctl_configure): the earliest point to wrap it
        super()._verify_hook(hook, hookimpl)
        self._guard_impl(hook.name, hookimpl)

    def register(self, plugin, name=None):
        name = super().register(plugin, name)
        # the same for any implementation _verify_hook did not see (kept if pluggy changes)
        for caller in self.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and caller.spec is not None:
                    self._guard_impl(caller.name, impl)
        return name

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
        except (ValueError, pluggy.PluginValidationError) as e:
            if self.is_registered(plugin):
                self.unregister(plugin)
            raise PluginError(f"cannot register plugin {name!r}: {e}") from e
        except BaseException:  # a historic hook replayed on registration raised
            if self.is_registered(plugin):
                self.unregister(plugin)
            raise
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
            dist, version = (ep.dist.name, ep.dist.version) if ep.dist else (None, None)
            try:
                plugin = ep.load()
            except Exception as e:  # kept as broken: --help, plugins and doctor still work
                self.broken[name] = BrokenPlugin(name, _ep_where(ep), "failed to import", e)
                continue
            try:
                self.add_plugin(plugin, name, "entry point", dist, version)
            except Exception as e:  # pluggy refused it, or its historic sftctl_configure raised
                self.broken[name] = BrokenPlugin(name, _ep_where(ep), "cannot be registered",
                                                 e.__cause__ if type(e) is PluginError and
                                                 e.__cause__ else e)
        if only is not None:
            missing = [n for n in only if n not in eps and n not in BUILTIN_PLUGINS]
            if missing:
                raise PluginError(f"{ENV_PLUGINS} names plugins that are not installed: "
                                  f"{', '.join(missing)}; installed: "
                                  f"{', '.join(sorted(eps)) or 'none'}")

    def check(self) -> None:
        """``check_pending``: a plugin implementing an unknown hook is unregistered and kept in
        ``broken`` (its message names the plugin, the unknown hook and the valid names)."""
        while True:
            try:
                self.check_pending()
                break
            except pluggy.PluginValidationError as e:
                name = self.get_name(e.plugin) or repr(e.plugin)
                unknown = [n for n in self.hook_names(specified=False)
                           if getattr(self.hook, n).spec is None and
                           any(i.plugin is e.plugin for i in getattr(self.hook, n).get_hookimpls())]
                info = self.infos.pop(name, None)
                self.unregister(e.plugin)
                where = f"module {info.module}" if info else repr(e.plugin)
                if info and info.distribution:
                    ep = self._available_entry_points.get(name)
                    where = _ep_where(ep) if ep else f"{where}, distribution {info.distribution}"
                self.broken[name] = BrokenPlugin(
                    name, where, f"implements unknown hook(s) {', '.join(unknown) or '?'}",
                    PluginError(f"the hooks are: {', '.join(self.hook_names())}"))
        for name, info in self.infos.items():
            plugin = self.get_plugin(name)
            info.hooks = sorted(impl_name for impl_name in self.hook_names()
                                if any(i.plugin is plugin for i in
                                       getattr(self.hook, impl_name).get_hookimpls()))

    def broken_error(self, names: list[str] | None = None) -> PluginError:
        """The error for broken plugins (all, or ``names``): each with its problem, then the
        ways to run without them."""
        items = [b for n, b in self.broken.items() if names is None or n in names]
        err = PluginError("; ".join(b.describe() for b in items) + f"; {WAYS_OUT}")
        err.__cause__ = items[0].error if items else None
        return err

    def hook_names(self, specified: bool = True) -> list[str]:
        """Names of the ``sftctl_*`` hooks (only those with a spec unless ``specified=False``)."""
        return sorted(n for n in dir(self.hook) if n.startswith("sftctl_") and
                      (not specified or getattr(self.hook, n).spec is not None))

    def require(self, names: list[str]) -> None:
        """Every ``--plugin`` name must be loaded; an unknown one lists the available names."""
        for name in names:
            if name in self.broken:
                raise self.broken_error([name])
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

            self.call_impl(impl, register=register, **(extra or {}))
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

    def trackers(self) -> dict[str, TrackerSpec]:
        """Experiment trackers (``--report-to``) registered through
        ``sftctl_register_trackers``."""
        return self._collect("sftctl_register_trackers", "tracker", TrackerSpec)

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
        self.check_benchmark_options(config, registered)
        return [b for b in registered.values() if b.plugin in config.plugins]

    def check_benchmark_options(self, config, registered: dict) -> None:
        """A benchmark option of a plugin the run does not enable is an error, not silently
        ignored: for each such plugin with options set away from their defaults, the plugin is
        asked again with those options at their defaults; when what it registers changes,
        the options steer benchmarks that will not run (e.g. ``--alpaca-heldout`` without
        ``--plugin alpaca``)."""
        options = self.config_options()
        by_plugin: dict[str, list[str]] = {}
        for name, o in options.items():
            if o.plugin not in config.plugins and config.options.get(name) != o.default:
                by_plugin.setdefault(o.plugin, []).append(name)
        for plugin, names in by_plugin.items():
            reset = dataclasses.replace(config, options={**config.options,
                                                         **{n: options[n].default for n in names}})
            mine = {n: b.to_dict() for n, b in registered.items() if b.plugin == plugin}
            if mine == {n: b.to_dict() for n, b in self.benchmarks(reset).items()
                        if b.plugin == plugin}:
                continue
            flags = ", ".join(f"{options[n].flag} (options.{n})" for n in names)
            raise ConfigError(f"{flags}: read by the benchmarks of plugin {plugin!r}, which this "
                              f"run does not enable: add --plugin {plugin} (or drop the "
                              "option)")

    def formats_of(self, plugin_name: str) -> list[str]:
        return [n for n, f in self.dataset_formats().items() if f.plugin == plugin_name]

    def add_commands(self, subparsers) -> None:
        """``sftctl_add_commands``, remembering which plugin added which subcommand so that an
        exception from a command names its plugin (exit 1: the command was running)."""
        hook = self.hook.sftctl_add_commands
        impls = hook.get_hookimpls()
        options = self.config_options()
        if any(i.hookwrapper or i.wrapper for i in impls):
            # a wrapper must run around the others: no attribution
            hook(subparsers=subparsers, options=options)
            return
        for impl in reversed(impls):  # pluggy's order: last registered first
            before = set(subparsers.choices)
            self.call_impl(impl, subparsers=subparsers, options=options)
            for cmd in set(subparsers.choices) - before:
                parser = subparsers.choices[cmd]
                func = parser.get_default("func")
                if callable(func):
                    parser.set_defaults(func=_command(func, impl.plugin_name, cmd))

    def call_chain(self, hook_name: str, value: str, *, reset_on_replace: tuple = (),
                   **kwargs):
        """Call a hook whose implementations may replace one argument (``value``, e.g. the
        model), one implementation at a time in pluggy's order: each receives what the previous
        one returned (``None``: unchanged). After a replacement the ``reset_on_replace``
        arguments become ``None``. Returns the final value."""
        hook = getattr(self.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):  # pluggy's order: last registered first
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook_name} cannot be a "
                                  "wrapper (its implementations are chained)")
            out = self.call_impl(impl, **kwargs)
            if out is not None:
                kwargs[value] = out
                kwargs.update({k: None for k in reset_on_replace})
        return kwargs[value]

    def config_defaults(self, plugins: list[str], data_format: str, embedded: bool
                        ) -> list[tuple[str, dict]]:
        """``sftctl_config_defaults``: one (layer name, nested dict) per plugin that answers;
        two plugins setting the same key is an error naming both."""
        layers, owner = [], {}
        for plugin, layer in self._dict_answers("sftctl_config_defaults", plugins=list(plugins),
                                                data_format=data_format, embedded=embedded):
            for section, values in layer.items():
                keys = values.items() if isinstance(values, dict) else [(None, values)]
                for k, _ in keys:
                    dotted = section if k is None else f"{section}.{k}"
                    if dotted in owner:
                        raise PluginError(f"{dotted} is set by the defaults of plugin "
                                          f"{owner[dotted]!r} and of plugin {plugin!r}")
                    owner[dotted] = plugin
            layers.append((f"defaults of plugin {plugin!r}", layer))
        return layers

    def _dict_answers(self, hook_name: str, **kwargs):
        """(plugin name, dict) for each implementation of ``hook_name`` that answers, in
        registration order; an answer that is neither a dict nor None names the plugin."""
        for impl in getattr(self.hook, hook_name).get_hookimpls():
            out = self.call_impl(impl, **kwargs)
            if out is None:
                continue
            if not isinstance(out, dict):
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook_name} returned "
                                  f"{type(out).__name__}, expected a dict or None")
            yield impl.plugin_name, out

    # from_pretrained keywords a plugin may set (sftctl_model_load_options); sftctl owns the rest
    LOAD_OPTION_KEYS = ("dtype", "quantization_config")

    def model_load_options(self, config, device) -> tuple[dict, dict]:
        """``sftctl_model_load_options`` merged: (keyword arguments, {key: plugin}); a key
        outside ``LOAD_OPTION_KEYS`` or set by two plugins is an error naming the plugin(s)."""
        merged, owner = {}, {}
        for plugin, out in self._dict_answers("sftctl_model_load_options", config=config,
                                              device=device):
            for k, v in out.items():
                if k not in self.LOAD_OPTION_KEYS:
                    raise PluginError(f"plugin {plugin!r}: sftctl_model_load_options set {k!r}; "
                                      f"plugins may set only {', '.join(self.LOAD_OPTION_KEYS)}")
                if k in owner:
                    raise PluginError(f"the model load option {k!r} is set by plugin "
                                      f"{owner[k]!r} and by plugin {plugin!r}")
                merged[k], owner[k] = v, plugin
        return merged, owner

    def describe(self, config=None) -> list[dict]:
        """Plugins with what they registered (``sftctl plugins``)."""
        formats, opts, scheds = self.dataset_formats(), self.optimizers(), self.schedulers()
        trackers = self.trackers()
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
                "trackers": sorted(k for k, v in trackers.items() if v.plugin == name),
            })
        return out


def get_plugin_manager(requested: list[str] | None = None, *, entry_points: bool = True,
                       extra: list[tuple[str, Any]] | None = None,
                       strict: bool = True) -> PluginManager:
    """Build a plugin manager with the built-ins, entry-point plugins and ``extra`` objects.

    ``extra``: ``(name, plugin)`` pairs registered after the built-ins (tests use this for
    temporary plugins). ``strict``: raise ``broken_error()`` when a plugin could not be loaded;
    the CLI passes ``False`` and decides per command (see module doc).
    """
    pm = PluginManager()
    pm.load_builtins()
    for name, plugin in extra or []:
        pm.add_plugin(plugin, name, "registered")
    if entry_points:
        pm.load_entry_point_plugins(requested)
    pm.check()
    if strict and pm.broken:
        raise pm.broken_error()
    return pm

