"""The ``sftctl`` command line: ``train``, ``plugins``, ``doctor`` (+ ``eval``/``report`` from
``sftctl.evals`` and commands added by plugins).

Design choices
- ``train``'s options are generated from the config dataclasses (``config.py``), so every YAML
  key with a flag has exactly one flag and one help text; ``--set KEY=VALUE`` reaches every key
  (including plugin options), and plugin options also get their own flags.
- Plugins load before the parser is built (their options become flags); ``--plugin`` values are
  read from the raw arguments first so a named third-party plugin loads even when autoload is
  disabled.
- Config layers: the CLI turns flags, ``--set`` and ``--config`` into nested dicts; the layering
  rules (derived defaults, a format's tuned defaults, file, command line) are
  ``sftctl.run.config.run_layers``.
- Exit codes: 0 only when training finished and the final checkpoint is complete (and the
  post-training evaluation, when it runs, succeeded); 2 for invalid input (config, data, plugins,
  model path), reported before any training step; 1 for a failure during training; otherwise
  the evaluation's own status (3 a benchmark failed, 4 no report, 5 a ``--require`` gate
  failed, everything written; ``sftctl.evals``); 75 when SIGTERM/SIGINT stopped training after
  saving a resumable checkpoint (see docs/reliability.md); 130 for Ctrl-C outside the training loop
  (nothing to save). The output directory is locked, checked and, under ``--overwrite``, its
  previous run moved aside before the run starts (``rundir.py``). Errors are one message naming the file,
  record and field, and the plugin and hook when a plugin raised it (2 before training starts,
  1 once it has); ``--debug`` (any position) or ``SFTCTL_DEBUG=1`` also prints the traceback.
- A broken third-party plugin (see ``plugin_manager``) stops every command except ``plugins``
  and ``doctor`` (which list it) and ``--help``.
- Output: logging on stderr through tqdm (bars are not broken by log lines); ``--quiet`` keeps
  warnings only and hides the bars; ranks other than 0 only report errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import traceback
import typing
from pathlib import Path

from . import config as C
from ..errors import ConfigError, PluginError, PluginHookError, SftctlError

log = logging.getLogger("sftctl")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was saved, run again with --resume


# ------------------------------------------------------------------------------------- logging


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(quiet: bool, rank: int = 0) -> None:
    level = logging.WARNING if quiet else logging.INFO
    if rank != 0:
        level = logging.ERROR
    log.handlers[:] = []
    h = _TqdmHandler()
    h.setFormatter(logging.Formatter("sftctl: %(message)s"))
    log.addHandler(h)
    log.setLevel(level)
    log.propagate = False
    try:  # transformers' own bars (loading/writing shards) duplicate our log lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if quiet or rank != 0:
            hf_logging.set_verbosity_error()
    except Exception:
        pass


# -------------------------------------------------------------------------------- train parser


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return _base_type(typing.get_args(tp)[0])
    if args:
        return _base_type(args[0])
    return tp


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        d = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        d = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if d is None or d == []:
        return ""
    return f" (default: {d})"


def add_config_arguments(p: argparse.ArgumentParser, options: dict, *,
                         only: set[str] | None = None,
                         aliases: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Add one flag per config field (and plugin option); return dotted key -> flag.

    ``only``: just these dotted keys (other commands reuse train's flags, e.g. ``sftctl eval``;
    the value lands in ``args`` under the dotted key, absent when not given); ``aliases``:
    extra spellings of a key's flag."""
    flags: dict[str, str] = {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    aliases = aliases or {}
    for dotted, f, tp in C.iter_fields():
        meta = f.metadata
        flag = meta.get("flag")
        if not flag or (only is not None and dotted not in only):
            continue
        section = dotted.split(".", 1)[0]
        if section in C.SECTIONS and section not in groups:
            groups[section] = p.add_argument_group(f"{section} options")
        g = groups.get(section, p)
        flag = [flag, *aliases.get(dotted, [])]
        help_ = meta["help"] + f"  [{dotted}]"
        kind = meta["cli"]
        base = _base_type(tp)
        choices = [c for c in (meta.get("choices") or ()) if c is not None] or None
        kw: dict = dict(dest=dotted, default=argparse.SUPPRESS)
        metavar = meta.get("metavar") or ("N" if base is int else "X" if base is float
                                          else f.name.upper())
        if kind == "bool":
            g.add_argument(*flag, action=argparse.BooleanOptionalAction,
                           help=help_ + _default_text(f), **kw)
        elif kind in ("store_true", "store_false"):
            g.add_argument(*flag, action=kind, help=help_, **kw)
        elif kind == "append":
            g.add_argument(*flag, action="append", type=base, metavar=metavar,
                           help=help_, **kw)
        elif kind == "optional":  # --flag [VALUE]; bare flag means the const
            g.add_argument(*flag, nargs="?", const="latest", type=base, metavar=metavar,
                           help=help_, **kw)
        elif kind == "nargs":
            g.add_argument(*flag, nargs="+", type=base, metavar=metavar,
                           help=help_ + _default_text(f), **kw)
        else:
            g.add_argument(*flag, type=base, choices=choices, metavar=None if choices else metavar,
                           help=help_ + _default_text(f), **kw)
        flags[dotted] = flag[0]
    if options:
        g = p.add_argument_group("plugin options (YAML: options: {NAME: VALUE})")
        for name, o in sorted(options.items()):
            dest = f"options.{name}"
            typ = o.type if o.type in (int, float, str) else str
            if o.type is bool:
                g.add_argument(o.flag, action=argparse.BooleanOptionalAction, dest=dest,
                               default=argparse.SUPPRESS,
                               help=f"{o.help} [plugin {o.plugin}] (default: {o.default})")
            else:
                g.add_argument(o.flag, type=typ, dest=dest, default=argparse.SUPPRESS,
                               metavar=None if o.choices else
                               {int: "N", float: "X"}.get(typ, "VALUE"),
                               choices=list(o.choices) if o.choices else None,
                               help=f"{o.help} [plugin {o.plugin}]" +
                                    (f" (default: {o.default})" if o.default is not None else ""))
            flags[dest] = o.flag
    return flags


def build_train_parser(sub, options: dict) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="fine-tune a causal LM (SFT)",
        description="Fine-tune a Hugging Face causal LM on instruction data. With no --model and "
                    "no --data it trains sftctl's embedded tiny Llama on the demo data of the "
                    "--plugin format (e.g. `sftctl train --plugin alpaca`); the defaults shown "
                    "are then replaced by the format's tuned defaults (see --print-config). "
                    "Every option is also a key of the YAML config, shown in brackets.",
        formatter_class=argparse.HelpFormatter)
    p.add_argument("--config", metavar="RUN.YAML",
                   help="YAML config (sections model, data, optim, train, eval, plugins, "
                        "options); flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Set any config key, e.g. --set optim.betas=[0.9,0.95] or --set "
                        "options.alpaca.demo_seed=3 (value parsed as YAML; repeatable)")
    p.add_argument("--print-config", action="store_true",
                   help="Print the resolved config as YAML and exit without training")
    add_config_arguments(p, options)
    p.set_defaults(func=cmd_train)
    return p


def _requested_plugins(argv: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a == "--plugin" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--plugin="):
            out.append(a.split("=", 1)[1])
    return out


# ------------------------------------------------------------------------------ config layers


def resolve_config(args: argparse.Namespace, pm, options: dict) -> C.RunConfig:
    """Merge the config layers (see module docstring) into a validated RunConfig."""
    import yaml

    cli: dict = {}
    for key, value in vars(args).items():
        if "." in key or key == "plugins":
            C.set_dotted(cli, key, value)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: invalid value: {e}") from None
        C.set_dotted(cli, key.strip(), value)
    file_layer = C.load_yaml(args.config) if args.config else {}
    file_name = str(args.config) if args.config else "config"
    layers = C.run_layers(cli, file_layer, file_name, pm)
    cfg = C.build_config(layers, options)
    C.check_eval_every(cfg, [(file_name, file_layer), ("command line", cli)])
    return cfg


# ----------------------------------------------------------------------------------- commands


def _prepare_output_dir(cfg: C.RunConfig):
    """Lock the output directory, resolve leftovers of a killed run, check it holds no run
    (unless --resume/--overwrite), move a run that --overwrite replaces aside (``rundir.py``).
    Returns (directory, lock, previous run or None)."""
    from .rundir import (PreviousRun, RunDirLock, check_inputs_outside, clean_leftovers,
                         held_run, recover_previous)

    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir: {out} exists and is not a directory")
    lock = RunDirLock(out).acquire()  # before anything else touches the directory
    try:
        clean_leftovers(out)
        recover_previous(out)
        markers = held_run(out)
        if markers and not cfg.train.overwrite and not cfg.train.resume:
            raise ConfigError(f"train.output_dir: {out} already holds a run "
                              f"({', '.join(markers)}); choose another --output-dir, pass "
                              "--resume to continue it or --overwrite to start again")
        previous = None
        if cfg.train.overwrite:
            check_inputs_outside(out, [
                ("--model", cfg.model.name_or_path), ("--tokenizer", cfg.model.tokenizer),
                *(("--data", p) for p in cfg.data.paths),
                *(("--val-data", p) for p in cfg.data.val_paths)])
            previous = PreviousRun(out)
            previous.move_aside()
    except BaseException:
        lock.release()
        raise
    return out, lock, previous


def cmd_train(args, pm, options) -> int:
    from ..training.distributed import world_size_from_env
    from ..training.checkpoint import prepare_resume
    from ..training.trainer import Trainer

    cfg = resolve_config(args, pm, options)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(cfg.train.quiet, rank)
    if args.print_config:
        print(C.dump_yaml(cfg), end="")
        return EXIT_OK
    if not cfg.eval.enabled and cfg.eval.every and rank == 0:
        # not a conflict, but easy to misread: name what each option does
        log.warning("--no-eval turns off the post-training benchmarks and report only; "
                    "validation still runs every %d steps (--eval-every)", cfg.eval.every)
    world_size_from_env()
    prepare_resume(cfg)  # --resume: output dir of PATH, --overwrite conflict, finished run
    trainer = Trainer(cfg, pm)
    lock = previous = None
    if trainer.is_main:  # other ranks share rank 0's lock (they only write where it writes)
        out, lock, previous = _prepare_output_dir(cfg)
    try:
        return _train(cfg, pm, trainer, rank, previous)
    except BaseException:
        if previous is not None:  # the previous run comes back unless this one has a result
            previous.settle(failed=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, pm, trainer, rank: int, previous) -> int:
    from ..training.atomic import checkpoint_complete, write_text

    if trainer.is_main:
        out = Path(cfg.train.output_dir)
        try:
            write_text(out / "config.yaml", C.dump_yaml(cfg))
        except OSError as e:
            from ..training.checkpoint import describe_os_error

            raise ConfigError(f"train.output_dir: cannot write {out / 'config.yaml'}: "
                              f"{describe_os_error(e)}") from None
        log.info("run directory: %s", out.resolve())
    trainer.benchmarks = _benchmarks(cfg, pm, rank)  # after the output dir is ready: task files
    trainer.setup()
    # SIGTERM/SIGINT: checkpoint at the next step boundary; a full or read-only disk: a message
    with trainer.checkpointer.preemption, \
            trainer.checkpointer.wrap_disk_errors(f"training output in {cfg.train.output_dir}"):
        summary = trainer.train()
    out = Path(cfg.train.output_dir)
    if previous is not None:  # the new run is complete: the previous one goes
        previous.settle(failed=not checkpoint_complete(out / "model"))
    if trainer.checkpointer.preemption.requested:  # the signal came after the last step
        log.warning("%s received after the last step: the final model is complete; the "
                    "post-training evaluation is skipped (run `sftctl eval` for it)",
                    trainer.checkpointer.preemption.requested)
        return EXIT_PREEMPTED
    if trainer.is_main and not checkpoint_complete(out / "model"):
        log.error("the final checkpoint in %s is incomplete", out / "model")
        return EXIT_FAILED
    if trainer.is_main:
        log.info("done: %d steps, final loss %s, val loss %s; model in %s", summary["steps"],
                 _fmt(summary["final_loss"]), _fmt(summary["val_loss"]), out / "model")
        for fb in summary.get("fallbacks") or []:  # said at the start too; repeated at the end
            log.warning("fallback during this run: %s (asked %s, used %s)", fb["what"],
                        fb["asked"], fb["used"])
    status = EXIT_OK
    if cfg.eval.enabled and trainer.is_main:
        status = _post_train(trainer, out, cfg, pm)
    trainer.strategy.shutdown()
    return status


def _benchmarks(cfg, pm, rank: int) -> list[dict]:
    """What summary.json records for the post-training evaluation (rank 0 writes it)."""
    if rank != 0 or not cfg.train.output_dir:
        return []
    return [b.to_dict() for b in pm.run_benchmarks(cfg)]


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _post_train(trainer, out: Path, cfg, pm) -> int:
    """The ``sftctl_post_train`` hooks (the built-in ``evals`` plugin: benchmarks and report)."""
    # free the training memory before post-training work loads models
    trainer.model = trainer.optimizer = trainer.scheduler = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
    statuses = pm.hook.sftctl_post_train(run_dir=out, config=cfg, pm=pm)
    return max([int(s) for s in statuses if s is not None], default=EXIT_OK)


def cmd_plugins(args, pm, options) -> int:
    info = pm.describe()
    formats = pm.dataset_formats()
    broken = [b.to_dict() for b in pm.broken.values()]
    if args.json:
        payload = {"plugins": info,
                   "broken": broken,
                   "installed_not_loaded": pm.skipped_entry_points,
                   "dataset_formats": {n: {"plugin": f.plugin, "description": f.description,
                                           "fields": dict(f.fields), "required": list(f.required),
                                           "demo_data": f.demo_data is not None}
                                       for n, f in formats.items()},
                   "options": {n: {"plugin": o.plugin, "type": o.type.__name__,
                                   "default": o.default, "help": o.help}
                               for n, o in options.items()}}
        print(json.dumps(payload, indent=2, default=str))
        return EXIT_OK
    for p in info:
        where = p["source"] + (f", {p['distribution']} {p['version']}" if p["distribution"] else "")
        print(f"{p['name']}  ({where}; {p['module']})")
        for key in ("dataset_formats", "optimizers", "schedulers", "trackers", "options"):
            if p[key]:
                print(f"    {key.replace('_', ' ')}: {', '.join(p[key])}")
        print(f"    hooks: {', '.join(h.removeprefix('sftctl_') for h in p['hooks'])}")
    _print_broken(pm)
    if pm.skipped_entry_points:
        print("installed but not loaded (SFTCTL_PLUGINS / SFTCTL_DISABLE_PLUGIN_AUTOLOAD): "
              + ", ".join(pm.skipped_entry_points))
    return EXIT_OK


def _print_broken(pm) -> None:
    for b in pm.broken.values():
        print(f"{b.name}  BROKEN: {b.problem} ({b.where})")
        print(f"    {b.error_text()}")
    if pm.broken:
        from .plugin_manager import WAYS_OUT

        print(f"    commands other than plugins and doctor stop until it is fixed or "
              f"uninstalled; {WAYS_OUT}")


def doctor_report() -> dict:
    import platform

    import torch

    from ..training.trainer import versions

    rep: dict = {"versions": versions(), "python_executable": sys.executable,
                 "platform": platform.platform(), "cpu_count": os.cpu_count()}
    ext: dict = {"loaded": False}
    try:
        from .. import _C  # noqa: F401

        ext["loaded"] = True
        ext["path"] = getattr(_C, "__file__", None)
        kernels = {}
        for op in ("cross_entropy", "cross_entropy_", "sft_labels", "scale_grad_"):
            kernels[op] = [k for k in ("CPU", "CUDA")
                           if torch._C._dispatch_has_kernel_for_dispatch_key(f"sftctl::{op}", k)]
        ext["kernels"] = kernels
        ext["backends"] = sorted({k for ks in kernels.values() for k in ks})
    except Exception as e:
        ext["error"] = f"{type(e).__name__}: {e}"
    try:
        from .. import extension_info

        ext["info"] = extension_info()  # CPU kernel ISA, whether CUDA kernels were compiled
    except Exception:
        pass
    rep["extension"] = ext
    dev: dict = {"cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        dev["devices"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                           "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                           "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                          for i in range(torch.cuda.device_count())]
        dev["bf16"] = torch.cuda.is_bf16_supported()
    dev["selected"] = "cuda" if torch.cuda.is_available() else "cpu"
    rep["device"] = dev
    from .._runtime import cpu_threads_info

    rep["cpu_threads"] = cpu_threads_info()
    rep["training_paths"] = _training_paths()
    try:
        import lm_eval

        rep["versions"]["lm_eval"] = getattr(lm_eval, "__version__", "installed")
    except Exception:
        rep["versions"]["lm_eval"] = None
    return rep


def _training_paths() -> dict:
    """The trainer's fast paths on this machine and what it falls back to (docs/performance.md);
    a run's actual choices and fallbacks are in its summary.json."""
    out: dict = {}
    try:
        from ..training import attention, head

        out["fused_head"] = head.availability()
        out["packed_attention"] = attention.availability()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _print_training_paths(tp: dict) -> None:
    if "error" in tp:
        print(f"training paths: unknown ({tp['error']})")
        return
    fh, pa = tp["fused_head"], tp["packed_attention"]
    if fh["available"]:
        ks = ", ".join(fh["compiled_kernels"]) or "none compiled: the chunked PyTorch reference"
        print(f"fused head (linear + cross-entropy): available; kernels: {ks}")
    else:
        print(f"fused head (linear + cross-entropy): NOT available ({fh['reason']}); runs use "
              "logits + cross_entropy (a counted fallback)")
    tv = ("yes" + (" (windows" if pa["torch_varlen_window"] else " (no windows") +
          (", GQA)" if pa["torch_varlen_gqa"] else ", GQA by repeating heads)")
          if pa["torch_varlen_attn"] else "no")
    print(f"varlen attention: flash-attn {pa['flash_attn'] or 'not installed'}; torch "
          f"varlen_attn: {tv}")
    print(f"    --packing here: {pa['packing_default']}")


def cmd_doctor(args, pm, options) -> int:
    rep = doctor_report()
    rep["plugins"] = sorted(pm.infos)
    rep["broken_plugins"] = [b.to_dict() for b in pm.broken.values()]
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        print("versions:")
        for k, v in rep["versions"].items():
            print(f"    {k}: {v or ('none (CPU build of torch)' if k == 'cuda' else 'not installed')}")
        e = rep["extension"]
        if e["loaded"]:
            print(f"extension sftctl._C: loaded ({e['path']})")
            info = e.get("info") or {}
            cpu_isa = f" (CPU kernels: {info['cpu_capability']})" if info.get("cpu_capability") \
                else ""
            print(f"    kernels: {', '.join(e['backends']) or 'none'}{cpu_isa}; CUDA kernels "
                  f"compiled: {'yes' if info.get('cuda_compiled') else 'no'}")
            for op, ks in e["kernels"].items():
                print(f"    {op}: {', '.join(ks) or 'no kernel'}")
        else:
            print(f"extension sftctl._C: NOT loaded ({e.get('error')}); --loss-impl torch works, "
                  "rebuild with pip install --no-build-isolation -e .")
        d = rep["device"]
        if d["cuda_available"]:
            for x in d["devices"]:
                print(f"device: cuda:{x['index']} {x['name']} (sm {x['capability']}, "
                      f"{x['memory_bytes'] / 2**30:.1f} GiB)")
        else:
            print(f"device: cpu ({rep['cpu_count']} cores; no CUDA device)")
        t = rep["cpu_threads"]
        print(f"cpu threads: {t['torch_threads']}; OpenMP wait policy: "
              f"{t['omp_wait_policy'] or 'default (spin)'}"
              + (f" (set by sftctl: {t['omp_wait_policy_set_by_sftctl']})"
                 if t['omp_wait_policy_set_by_sftctl'] else ""))
        _print_training_paths(rep.get("training_paths") or {})
        print(f"plugins: {', '.join(rep['plugins'])}")
        _print_broken(pm)
    healthy = rep["extension"]["loaded"] and not pm.broken
    return EXIT_OK if healthy else EXIT_FAILED


# ----------------------------------------------------------------------------------------- main


def build_data_parser(sub, options: dict) -> None:
    p = sub.add_parser("data", help="inspect training data as sftctl encodes it")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True
    pp = dsub.add_parser(
        "preview", help="print the first examples with the trained tokens highlighted",
        description="Encode the first N training examples exactly as `sftctl train` with the same "
                    "options would (format, template, tokenizer, truncation) and print them with "
                    "the trained tokens highlighted (colour on a terminal, [[ ]] otherwise).")
    pp.add_argument("-n", "--num", type=int, default=3, metavar="N",
                    help="how many examples (default 3)")
    pp.add_argument("--json", action="store_true",
                    help="one JSON object per example: input_ids, tokens, loss_mask, text")
    pp.add_argument("--config", metavar="RUN.YAML", help="YAML config, as for train")
    pp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Set any config key, as for train")
    add_config_arguments(pp, options)
    pp.set_defaults(func=cmd_data_preview)


def cmd_data_preview(args, pm, options) -> int:
    from .preview import preview

    if args.num < 1:
        raise ConfigError(f"--num: expected a positive integer, got {args.num}")
    cfg = resolve_config(args, pm, options)
    setup_logging(True)
    return preview(cfg, pm, args.num, args.json)


def build_parser(pm, options) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sftctl",
        description="Supervised fine-tuning of Hugging Face causal LMs with fused loss kernels, "
                    "plugins and post-training benchmark reports.")
    # main() takes --debug out of the arguments wherever it is; declared here for --help
    p.add_argument("--debug", action="store_true",
                   help="on an error, also print the traceback (any position; or SFTCTL_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    build_train_parser(sub, options)
    pp = sub.add_parser("plugins", help="list loaded plugins and what they register")
    pp.add_argument("--json", action="store_true", help="machine-readable output")
    pp.set_defaults(func=cmd_plugins)
    pd = sub.add_parser("doctor", help="versions, extension kernels, devices")
    pd.add_argument("--json", action="store_true", help="machine-readable output")
    pd.set_defaults(func=cmd_doctor)
    build_data_parser(sub, options)
    from .config_import import build_config_parser

    build_config_parser(sub)
    pm.add_commands(sub)
    return p


DIAGNOSTIC_COMMANDS = ("plugins", "doctor")  # they run with a broken plugin installed


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("SFTCTL_DEBUG", "") not in ("", "0")


def _report_error(e: SftctlError, debug: bool) -> None:
    """One line on stderr (the traceback before it with --debug)."""
    from .plugin_manager import BUILTIN_PLUGINS

    if debug:
        traceback.print_exception(e, file=sys.stderr)
    msg = str(e)
    if e.plugin and not isinstance(e, PluginHookError) and e.plugin not in BUILTIN_PLUGINS:
        msg += f" [raised by plugin {e.plugin!r} in {e.hook}]"
    if not debug and (isinstance(e, PluginHookError) or
                      (isinstance(e, PluginError) and e.__cause__ is not None)):
        msg += " (sftctl --debug prints the traceback)"
    print(f"sftctl: error: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    setup_logging(quiet="--quiet" in argv, rank=int(os.environ.get("RANK", "0")))
    try:
        from .plugin_manager import get_plugin_manager

        pm = get_plugin_manager(_requested_plugins(argv), strict=False)
        options = pm.config_options()
        parser = build_parser(pm, options)
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # --help, or a usage error (a broken plugin's command is missing)
            for b in pm.broken.values():
                log.warning("%s", b.describe())
            raise
        if pm.broken and args.command not in DIAGNOSTIC_COMMANDS:
            raise pm.broken_error()
        func = args.func
        import inspect

        if len(inspect.signature(func).parameters) == 1:
            return int(func(args) or 0)  # commands added by plugins / evals take args only
        return int(func(args, pm, options) or 0)
    except SftctlError as e:
        try:  # close a progress bar the error interrupted: the message gets its own line
            from tqdm import tqdm

            for bar in list(getattr(tqdm, "_instances", ())):
                bar.close()
        except Exception:
            pass
        _report_error(e, debug)
        return e.exit_code
    except KeyboardInterrupt:
        print("sftctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
