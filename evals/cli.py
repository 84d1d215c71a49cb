"""``sftctl eval`` and ``sftctl report`` (added to the main CLI by the ``evals`` plugin through ``sftctl_add_commands``).

``sftctl eval CHECKPOINT [--base MODEL] [--tasks T ...] [--output-dir DIR]``
    CHECKPOINT is a run directory (``summary.json`` + ``model/``), a checkpoint inside one, or any
    Hugging Face model directory or cached hub id. Benchmarks default to the run's (its
    ``summary.json``); ``--tasks`` picks registered benchmarks by name, and any other name is run as
    a standard lm-eval task. The base model defaults to the run's ``base_model``; ``--base none``
    evaluates the checkpoint alone. Results and the report go to the run directory, or to
    ``--output-dir``.
``sftctl report RUN_DIR``
    Regenerates report.json/.md/.html from the run directory alone.

Design choices
- Both commands take ``(args, pm, options)`` so the report gets the loaded plugin manager (report
  sections) and ``--plugin`` can bring a plugin's benchmarks to a plain checkpoint.
- Argument and input problems raise ``SftctlError`` subclasses, so the main CLI prints one line
  and exits 2; a failed benchmark is not an error of the command: it is in the report and the
  exit status is ``EXIT_BENCHMARK_FAILED`` (3).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_eval_parser", "add_report_parser", "cmd_eval", "cmd_report"]

# config keys whose `sftctl train` flags `sftctl eval` shares (dotted key -> attribute used here):
# --plugin, --tasks (comma-separated lists work too), --eval-limit (alias --limit), --device
# (default here: cuda when present), --quiet (logs go to eval/)
SHARED_FLAGS = {"plugins": "plugin", "eval.tasks": "tasks", "eval.limit": "limit",
                "train.device": "device", "train.quiet": "quiet"}


def _shared(args) -> None:
    """Copy the shared config-key values onto the short names cmd_eval reads (absent: unset)."""
    for dotted, name in SHARED_FLAGS.items():
        setattr(args, name, getattr(args, dotted, None))
    args.plugin = args.plugin or []
    args.quiet = bool(args.quiet)
    if args.device == "auto":
        args.device = None
    if args.limit is not None and args.limit < 1:
        ConfigError, _ = _errors()
        raise ConfigError(f"--eval-limit: expected a positive integer, got {args.limit}")


def _errors():
    from sftctl.errors import ConfigError, ModelError
    return ConfigError, ModelError


def _positive_int(text: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_eval_parser(subparsers) -> Any:
    p = subparsers.add_parser(
        "eval", help="benchmark a checkpoint (and its base model) with lm-eval; write the report",
        description="Run lm-eval on CHECKPOINT and on its base model, for the benchmarks the "
                    "run registered (or --tasks), offline, and write report.json/.md/.html.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="run directory, checkpoint directory or cached hub id")
    p.add_argument("--base", metavar="MODEL", default=None,
                   help="base model to compare against (default: the run's base_model; "
                        "'none': evaluate the checkpoint alone)")
    p.add_argument("--output-dir", metavar="DIR", default=None,
                   help="where eval/ and the report go (default: the run directory, else "
                        "CHECKPOINT-eval)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                   help="lm-eval batch size (default 16)")
    p.add_argument("--dtype", default=None,
                   help="model dtype for lm-eval (default: float32 on CPU, the checkpoint's on CUDA)")
    # the options `sftctl train` also has come from the same config fields (one flag, one help)
    from sftctl.run.cli import add_config_arguments

    add_config_arguments(p, {}, only=set(SHARED_FLAGS), aliases={"eval.limit": ["--limit"]})
    p.set_defaults(func=cmd_eval)
    return p


def add_report_parser(subparsers) -> Any:
    p = subparsers.add_parser(
        "report", help="regenerate report.json/.md/.html of a run directory",
        description="Rebuild the run report from RUN_DIR alone (summary.json, metrics.jsonl, "
                    "eval/).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_report)
    return p


def _find_run(ckpt: Path) -> tuple[Path | None, Path]:
    """(run dir or None, model dir) for a local CHECKPOINT."""
    if (ckpt / "summary.json").is_file() and (ckpt / "model").is_dir():
        return ckpt, ckpt / "model"
    if (ckpt.parent / "summary.json").is_file():
        return ckpt.parent, ckpt
    return None, ckpt


def _split_names(values: list[str] | None) -> list[str]:
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return list(dict.fromkeys(out))


def cmd_eval(args, pm=None, options=None) -> int:
    from .runner import (EvalOptions, evaluate_models, finish_report, gather_tasks,
                         resolve_base_model)
    from .spec import BenchmarkSpec, specs_from_json

    ConfigError, ModelError = _errors()
    _shared(args)
    from sftctl.training.model import check_tokenizer_dir, resolve_path_or_id

    ref = args.checkpoint
    local = Path(ref).expanduser()
    if local.exists():
        run_dir, model = _find_run(local.resolve())
        if not (model / "config.json").is_file():
            raise ModelError(f"{model}: not a Hugging Face model directory (no config.json)")
        model_ref = str(model)
        # lm-eval would ask for sentencepiece or tiktoken: name the directory and what it lacks
        check_tokenizer_dir(model, "the checkpoint")
    # a path-like string that does not exist is "not found", never a hub lookup (model.py)
    elif re.match(r"^[\w.-]+/[\w.-]+$", resolve_path_or_id(ref, "checkpoint")):
        run_dir, model_ref = None, ref  # a hub id: must be in the local cache (offline)
    else:
        raise ModelError(f"checkpoint not found: {ref}")

    if args.output_dir:
        out_dir = Path(args.output_dir).expanduser().resolve()
    elif run_dir is not None:
        out_dir = run_dir
    else:
        name = Path(model_ref).name if local.exists() else model_ref.replace("/", "--")
        out_dir = (local.resolve().parent if local.exists() else Path.cwd()) / f"{name}-eval"
    out_dir.mkdir(parents=True, exist_ok=True)

    summary: dict = {}
    for path in ([run_dir / "summary.json"] if run_dir else []) + (
            [Path(model_ref) / "sftctl_summary.json"] if local.exists() else []):
        if path.is_file():
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: invalid JSON: {e}") from None
            break

    # benchmarks: the run's, plus those of --plugin plugins, narrowed by --tasks
    try:
        known = {s.name: s for s in specs_from_json(summary.get("benchmarks"), "summary.json")}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.plugin:
        if pm is None:
            raise ConfigError("--plugin needs the sftctl plugin manager (run through `sftctl eval`)")
        pm.require(args.plugin)
        from sftctl.run.config import build_config
        fmt = next((f for name in args.plugin for f in pm.formats_of(name)), None)
        layer = {"plugins": list(args.plugin), "train": {"output_dir": str(out_dir)}}
        if fmt:
            layer["data"] = {"format": fmt}
        cfg = build_config([("command line", layer)], pm.config_options())
        for s in gather_tasks(cfg, pm, limit=args.limit):
            known.setdefault(s.name, s)
    names = _split_names(args.tasks) or list(known)
    if not names:
        raise ConfigError("no benchmarks to run: this checkpoint's run registered none; give "
                          "--tasks (lm-eval task names) or --plugin NAME")
    tasks = []
    for n in names:
        spec = known.get(n) or BenchmarkSpec(name=n, description="lm-eval task")
        if args.limit is not None:
            import dataclasses
            spec = dataclasses.replace(spec, limit=min(args.limit, spec.limit or args.limit))
        tasks.append(spec)

    models: dict[str, str] = {}
    if args.base is None:
        base = resolve_base_model(run_dir, summary) if run_dir else summary.get("base_model")
        if base:
            models["base"] = str(base)
        elif not args.quiet:
            print("[sftctl eval] no base model known for this checkpoint (give --base MODEL): "
                  "evaluating the checkpoint alone", file=sys.stderr)
    elif args.base.lower() != "none":
        models["base"] = args.base
    models["sft"] = model_ref

    opts = EvalOptions(batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                       quiet=args.quiet)
    try:
        manifest = evaluate_models(models, tasks, out_dir, opts)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    return finish_report(out_dir, pm, manifest, opts)


def cmd_report(args, pm=None, options=None) -> int:
    from .report import write_report

    ConfigError, _ = _errors()
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    # a report needs something to report on; refusing writes nothing into a stranger's directory
    inputs = ("summary.json", "metrics.jsonl", "eval/manifest.json")
    if not any((run_dir / name).is_file() for name in inputs):
        raise ConfigError(f"{run_dir} is not a run directory: it has none of "
                          f"{', '.join(inputs)} (written by `sftctl train` and `sftctl eval`)")
    paths = write_report(run_dir, pm=pm)
    if not args.quiet:
        for kind in ("html", "md", "json"):
            print(paths[kind])
    return 0
