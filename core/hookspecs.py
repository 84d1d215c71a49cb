"""Every hook that sftctl calls: the whole plugin API in one module.

Design choices (after pytest, datasette, simonw/llm and tox 4)
- One project marker pair, ``sftctl``; every hook name starts with ``sftctl_``. Plugin authors
  use ``from sftctl import hookimpl`` and never import pluggy.
- What plugins *add* goes through registration callbacks (datasette/llm style):
  ``sftctl_register_dataset_formats(register)`` and friends call ``register(spec)`` once per
  item. The manager calls each plugin's implementation separately, so it knows which plugin
  registered what and can refuse duplicates naming both plugins.
- ``sftctl_configure`` is *historic* (as ``pytest_configure``): a plugin registered after the
  run was configured still receives the call.
- ``sftctl_load_dataset`` is *firstresult*: the first plugin that recognizes a data source
  answers; the others are not asked.
- Lifecycle hooks receive ``run``, a read-only ``RunContext`` (never the trainer, whose
  internals are not API); any of them may be implemented as a wrapper
  (``@hookimpl(wrapper=True)``, ``result = yield``) to run code around the other plugins.
- Hook arguments are passed by name, so an implementation may accept only the ones it needs.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("sftctl")
hookimpl = pluggy.HookimplMarker("sftctl")  # what plugins decorate their hooks with


# ---------------------------------------------------------------------------------------------
# Registration hooks (called once, when the plugin manager is set up)


@hookspec
def sftctl_add_options(register):
    """Add run options: ``register(ConfigOption(name, type, default, help, choices))``.

    ``name`` is dotted (``"myplugin.keep_top"``). Users set it in YAML under ``options:`` or with
    the flag ``--myplugin-keep-top``; read it with ``config.option("myplugin.keep_top")``.
    """


@hookspec
def sftctl_register_dataset_formats(register):
    """Register dataset formats: ``register(DatasetFormat(name, to_segments, ...))``."""


@hookspec
def sftctl_register_optimizers(register):
    """Register optimizers: ``register(OptimizerSpec(name, build, description))``."""


@hookspec
def sftctl_register_schedulers(register):
    """Register LR schedulers: ``register(SchedulerSpec(name, build, description))``."""


@hookspec
def sftctl_register_benchmarks(register, config):
    """Register post-training benchmarks: ``register(BenchmarkSpec(name, include_path, ...))``
    (``sftctl.BenchmarkSpec``: an lm-eval task name and the absolute folder of its task YAML;
    ``include_path=None`` for a task lm-eval ships).

    Called once per run during setup, with the run config (``config.train.output_dir`` is set,
    so task files can be written under ``OUTPUT_DIR/eval``). The benchmarks of the plugins named
    with ``--plugin`` (or those named by ``--tasks``) are recorded in summary.json and run by
    ``sftctl.evals`` on the base model and the SFT checkpoint after training.
    """


@hookspec
def sftctl_register_trackers(register):
    """Register experiment trackers: ``register(TrackerSpec(name, description, requires=(...),
    extra=...))`` (``sftctl.TrackerSpec``). ``--report-to NAME`` selects them (an unknown name
    or a missing package is an error before training); the tracker itself writes through the
    lifecycle hooks, on rank 0, when its name is in ``sftctl.trackers.selected_trackers(
    run.config)``."""


@hookspec
def sftctl_add_commands(subparsers, options):
    """Add ``sftctl`` subcommands: ``p = subparsers.add_parser(...)``; ``p.set_defaults(
    func=callable)``; the callable receives the parsed ``argparse.Namespace`` and returns an exit
    code. ``options`` (optional to declare): the registered plugin options (name ->
    ``ConfigOption``), for a command that offers them as flags the way ``train`` does
    (``sftctl.run.cli.add_config_arguments``)."""


# ---------------------------------------------------------------------------------------------
# Configuration and data


@hookspec(historic=True)
def sftctl_configure(config, pm):
    """The run config is validated (``config``: ``RunConfig``, ``pm``: the plugin manager).

    Historic: plugins registered later receive it on registration. Raise ``ConfigError`` to
    reject a combination of options.
    """


@hookspec
def sftctl_prepare_tokenizer(tokenizer, config):
    """The tokenizer is loaded (before any data is encoded and before the model is loaded).

    A plugin may set its chat template or add special tokens (``tokenizer.add_special_tokens``);
    when the vocabulary grew, the trainer resizes the model's embeddings to match and says so.
    Whatever is set here is saved with the final model's tokenizer.
    """


@hookspec
def sftctl_config_defaults(plugins, data_format, embedded):
    """Default config values of the plugins a run enables: return a nested dict shaped like a
    YAML config (``{"optim": {"lr": 1e-2}}``) or ``None``.

    Called once while ``sftctl train`` layers its config, before the config is validated, for
    every loaded plugin: answer only when your plugin is in ``plugins`` (the names enabled with
    ``--plugin``/``plugins:``). ``data_format`` is the run's dataset format, ``embedded`` is True
    when no ``--model`` is given (the format's embedded demo model trains). The layers returned
    sit above the format's tuned defaults (``DatasetFormat.demo_config``) and below the
    ``--config`` file and the command line, so a user's value always wins; two plugins setting
    the same key is an error naming both.
    """


@hookspec
def sftctl_model_load_options(config, device):
    """Keyword arguments for the ``from_pretrained`` call that loads the model: return a dict
    or ``None``. For what has to happen *while* the weights load: a quantization config (4-bit
    QLoRA), a dtype for weights that will stay frozen (so no fp32 copy is ever made).

    Called on every rank, once per run, after ``sftctl_prepare_tokenizer`` and before the model
    is loaded (then ``sftctl_prepare_model``). ``device`` is the run's ``torch.device`` (on a GPU
    the weights load straight onto it). Allowed keys: ``dtype`` (default ``torch.float32``: the
    optimizer's master weights) and ``quantization_config``; sftctl owns the others (the source, ``trust_remote_code``, ``revision``, ``device_map``,
    ``attn_implementation``) and refuses them. Two plugins setting the same key is an error
    naming both. A plugin that loads in another dtype is responsible for keeping the weights it
    trains in fp32 (``sftctl_prepare_model``).
    """


@hookspec
def sftctl_prepare_model(model, config):
    """The model is loaded: wrap, replace or change it before it trains (adapters such as LoRA,
    freezing layers, dtype choices). Return the model to train instead, or ``None`` to keep it
    (changes in place are fine too). Parameters left with ``requires_grad=False`` never reach
    the optimizer, and a frozen output layer gets no weight gradient.

    Called on every rank, once per run, between ``sftctl_prepare_tokenizer`` and the first
    step, in this order: model loaded (fp32 unless ``sftctl_model_load_options`` said otherwise,
    on the run's device, embeddings resized for added tokens, activation checkpointing applied)
    -> **this hook** -> ``--compile`` (the blocks of
    the returned model) -> the strategy's wrapper (DDP / FSDP2 sharding) -> optimizer built from
    the trainable parameters -> ``--resume`` restores the checkpoint into the returned model
    (so a resumable checkpoint holds that model's state dict and a resumed run must prepare the
    same model) -> ``sftctl_train_start``. The implementations are chained: each receives the
    model the previous one returned (pluggy's order: last registered first). ``config``: the
    validated ``RunConfig``. Raise ``ConfigError`` naming the option for a model the options do
    not fit (no training has happened yet).
    """


@hookspec(firstresult=True)
def sftctl_load_dataset(source, config):
    """Load a data source that sftctl's loaders do not know (``source``: the ``--data`` string).

    Return a ``datasets.Dataset`` (or a list of dict records) or ``None`` to pass. The first
    non-``None`` answer wins.
    """


# ---------------------------------------------------------------------------------------------
# Training lifecycle: called on every rank (check ``run.is_main`` before writing files).
#
# ``run`` is a ``sftctl.training.context.RunContext``: a read-only view of the run (``config``,
# ``output_dir``, ``is_main``, ``rank``, ``world_size``, ``device``, ``model`` (unwrapped),
# ``tokenizer``, ``step``, ``epoch``, ``total_steps``, ``history``, ``resumed_from``) plus
# ``request_stop(reason)`` and ``extras`` (a dict for a plugin's per-run state).
#
# Order within ``sftctl train``: configure -> (setup: data, model loaded, prepare_model,
# compiled, wrapped for DDP/FSDP, optimizer built, ``--resume`` restored) -> train_start ->
# [step_end every --log-every steps, evaluate after each validation pass, checkpoint_saved after
# each periodic checkpoint]* -> save_model (rank 0,
# may replace what is saved) -> save (final model, into its temporary directory) -> after_train
# -> (rank 0, unless --no-eval) post_train.


@hookspec
def sftctl_train_start(run):
    """Training is about to start: model, optimizer, data and output dir are ready.

    ``run.step`` is the step training starts from (non-zero after a resume).
    """


@hookspec
def sftctl_step_end(run, step, metrics):
    """An optimizer step finished. ``metrics``: a copy of the dict written to metrics.jsonl for
    this step (keys ``kind``, ``step``, ``epoch``, ``loss``, ``lr``, ``tokens``,
    ``tokens_total``, ``tokens_per_s``, ``grad_norm``, ``time``); called every ``--log-every``
    steps. ``run.request_stop(reason)`` ends training after this step (validation and the final
    save still happen). On CUDA (``--async-metrics auto``) a step's metrics are read once the
    next step is queued, so this hook for step k runs after step k+1 was launched and a stop
    requested here ends training after step k+1 (docs/performance.md)."""


@hookspec
def sftctl_checkpoint_saved(run, step, path):
    """A periodic checkpoint (``--save-every``) is complete on disk: ``path`` is its directory
    (``OUTPUT_DIR/checkpoints/step-N``, marker written), ``step`` the optimizer steps done.

    Called on every rank right after the save, before the next step; never for the preemption
    save (the run is ending) nor for the final model (``sftctl_save``). The training state must
    come out unchanged: read the model (``run.model``), never step it, and restore any RNG you
    draw from. Whatever the hook takes in time delays training by as much (other ranks wait at
    the next collective); the ``evals`` plugin benchmarks the checkpoint here on rank 0 for
    ``--benchmark-every``.
    """


@hookspec
def sftctl_evaluate(run, step, metrics):
    """A validation pass finished; ``metrics`` has ``kind="val"``, ``step``, ``val_loss``,
    ``val_ppl``. Plugins may add keys (they are logged and written to metrics.jsonl)."""


@hookspec
def sftctl_save_model(run, model, state_dict):
    """The final model is about to be written to ``OUTPUT_DIR/model``: return the model to save
    there instead (e.g. adapters merged into the base), or ``None`` to save ``model``.

    Rank 0 only, after training, the final validation and (FSDP) the gathering of the full
    weights, and before ``sftctl_save`` and ``sftctl_after_train``; periodic and preemption
    checkpoints never call it (they save the model as trained, for ``--resume``). ``model`` is
    the trained model, unwrapped from DDP/FSDP (``--compile`` leaves parameter names alone);
    ``state_dict`` holds its full weights on the CPU when they were gathered from shards (FSDP:
    ``model`` then holds shards only) and is ``None`` when ``model.state_dict()`` is complete.
    A returned model is saved with ``save_pretrained`` from its own state dict, so it must be
    a complete, unsharded ``PreTrainedModel``; training is over, so changing ``model`` in place
    is allowed. Chained like ``sftctl_prepare_model`` (after a replacement the next
    implementation receives ``state_dict=None``). Write extra outputs atomically here (the
    ``lora`` plugin writes ``OUTPUT_DIR/adapter``); ``run.output_dir`` is the run directory.
    """


@hookspec
def sftctl_save(run, path):
    """The final model is being written to ``path`` (a temporary directory renamed into place
    when every hook returned; rank 0 only). Write extra files into ``path`` to make them part
    of the checkpoint."""


@hookspec
def sftctl_after_train(run, summary):
    """Training ended and the final checkpoint is complete. ``summary`` is the dict written to
    summary.json; plugins may add keys to it (written after this hook)."""


@hookspec
def sftctl_post_train(run_dir, config, pm):
    """After ``sftctl train`` finished and the final model is complete, on rank 0 only, with the
    training memory released and unless ``--no-eval``: post-training work on the run directory
    (the built-in ``evals`` plugin benchmarks the base model and the SFT checkpoint and writes the
    report). ``run_dir``: ``Path``; ``config``: the run config; ``pm``: the plugin manager.
    Return an exit status (0: fine) or ``None``; the command exits with the largest one."""


# ---------------------------------------------------------------------------------------------
# Report


@hookspec
def sftctl_report_sections(run_dir, report):
    """Add sections to the benchmark report (called by ``sftctl.evals`` when it writes the
    report). ``run_dir``: the run directory (``Path``); ``report``: the report dict built so far
    (read-only). Return a section or a list of sections, each a dict with ``title`` and
    ``markdown`` (and optionally ``html``), or ``None``. A failing implementation is recorded
    in the report's warnings; the other sections still appear."""
