"""``sftctl eval`` and ``sftctl report`` (added to the main CLI by the ``evals`` plugin through ``sftctl_add_commands``).

``sftctl eval CHECKPOINT [--base MODEL] [--tasks T ...] [--output-dir DIR] [--config RUN.YAML]
[--heldout FILE] [--include-path DIR] [--num-fewshot N] [--apply-chat-template] [--online]
[--threads N] [--set KEY=VALUE] [plugin options]`` (docs/evaluation.md has the table)
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
- The eval config is built like train's (``build_config``): the run's format and plugin
  options, ``--config``, then the flags; plugin options are flags through the hook's ``options``.
- A plugin's demo benchmark on a checkpoint not trained on that demo runs (it was asked for)
  with a WARNING line and a report warning; "demo" is found by asking the plugin again as if
  --data were given (what it then no longer registers came from its demo data).
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
# train flags that only feed the eval config (read from it, with --config's values under them):
# --threads, --heldout FILE, --format (the held-out records' format)
CONFIG_FLAGS = {"train.threads", "eval.heldout", "data.format"}


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


def _nonneg_int(text: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _positive_int(text: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_eval_parser(subparsers, options: dict | None = None) -> Any:
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
    p.add_argument("--config", metavar="RUN.YAML", default=None,
                   help="YAML config in train's format; its plugins, options, data.format, "
                        "eval (tasks, limit, heldout) and train.threads/device apply; flags "
                        "override it")
    p.add_argument("--include-path", metavar="DIR", action="append", default=[],
                   help="folder of your own lm-eval task YAMLs (repeatable); --tasks names "
                        "tasks in it (default: every task in it)")
    p.add_argument("--num-fewshot", type=_nonneg_int, default=None, metavar="N",
                   help="few-shot examples for every lm-eval task (the held-out benchmark of "
                        "your data stays zero-shot)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render lm-eval prompts with the model's chat template (lm-eval's "
                        "apply_chat_template)")
    p.add_argument("--online", action="store_true",
                   help="allow downloads (models, data sets) for this evaluation; by default "
                        "the worker runs with HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config key that sftctl eval reads, e.g. --set eval.limit=20 or "
                        "--set options.alpaca.heldout=FILE (value parsed as YAML; repeatable; "
                        "keys: " + ", ".join(SET_KEYS) + ", options.NAME)")
    # the options `sftctl train` also has come from the same config fields (one flag, one help),
    # plugin options included (--alpaca-heldout, --chat-template, ...)
    from sftctl.run.cli import add_config_arguments

    add_config_arguments(p, options or {}, only=set(SHARED_FLAGS) | CONFIG_FLAGS,
                         aliases={"eval.limit": ["--limit"]})
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


def _eval_config(args, pm, options, run_dir: Path | None, out_dir: Path):
    """The eval's RunConfig, layered like train's: the run's own format and plugin options
    (a run directory's config.yaml), then ``--config``, then the flags. Returns (config, the
    plugins the user asked for: --plugin and the file's ``plugins``)."""
    from sftctl.run import config as C
    from sftctl.run.aliases import apply_aliases

    ConfigError, _ = _errors()
    cli: dict = {}
    for key, value in vars(args).items():
        if "." in key or key == "plugins":
            C.set_dotted(cli, key, value)
    for item in getattr(args, "set", None) or []:  # --set KEY=VALUE, after the flags
        key, value = _set_item(item, ConfigError)
        if key in ("plugins", "eval.tasks"):
            value = value if isinstance(value, list) else [value]
        C.set_dotted(cli, key, value)
    file_name = str(args.config) if args.config else "config"
    file_layer = C.load_yaml(args.config) if args.config else {}
    import logging
    file_layer = apply_aliases(file_layer, file_name, logging.getLogger("sftctl"))
    asked = list(dict.fromkeys([*(file_layer.get("plugins") or []), *(cli.get("plugins") or [])]))
    run_layer: dict = {}
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        try:
            run_cfg = C.load_yaml(run_dir / "config.yaml")
        except ConfigError:
            run_cfg = {}
        run_layer = {"options": {k: v for k, v in (run_cfg.get("options") or {}).items()
                                 if k in options}}
        run_plugins = [p for p in run_cfg.get("plugins") or [] if p in pm.infos]
        run_format = (run_cfg.get("data") or {}).get("format")
    else:
        run_plugins, run_format = [], None
    pm.require(asked)
    # the held-out records' format: --format / data.format, else the first --plugin format,
    # else the run's, else alpaca (train's rule, with the run in between)
    fmt = (cli.get("data") or {}).get("format") or (file_layer.get("data") or {}).get("format")
    if fmt is None:
        owned = [f for name in asked for f in
                 ([name] if name in pm.formats_of(name) else pm.formats_of(name)[:1])]
        fmt = owned[0] if owned else (run_format or "alpaca")
    enabled = list(dict.fromkeys([*run_plugins, *asked]))
    layers = [("defaults", {"plugins": enabled, "data": {"format": fmt}})]
    if run_layer:
        layers.append((str(run_dir / "config.yaml"), run_layer))
    layers.append((file_name, {k: v for k, v in file_layer.items() if k != "plugins"}))
    layers.append(("command line", {k: v for k, v in cli.items() if k != "plugins"}))
    # plugins write their task files into the evaluation's directory
    layers.append(("sftctl eval", {"train": {"output_dir": str(out_dir)}}))
    return C.build_config(layers, options), asked


# the config keys `sftctl eval` reads (--set and --config alike): anything else would be ignored
SET_KEYS = ("plugins", "data.format", "eval.tasks", "eval.limit", "eval.heldout",
            "train.threads", "train.device", "train.quiet")


def _set_item(item: str, ConfigError) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set`` (the value parsed as YAML, as in train); only keys that sftctl
    eval reads (``SET_KEYS`` and ``options.NAME``): any other is an error, not ignored."""
    import yaml

    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    if key not in SET_KEYS and not (key.startswith("options.") and len(key) > 8):
        raise ConfigError(f"--set {key}: sftctl eval does not read this key; it reads "
                          f"{', '.join(SET_KEYS)} and options.NAME (plugin options)")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: invalid value: {e}") from None


def _include_tasks(dirs: list[str]) -> dict[str, str]:
    """Task name -> its folder, for every task YAML in the --include-path folders."""
    import yaml

    from .spec import _TaskLoader

    ConfigError, _ = _errors()
    found: dict[str, str] = {}
    for d in dirs:
        folder = Path(d).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"--include-path: {d} is not a directory")
        for path in sorted(folder.rglob("*.y*ml")):
            try:
                cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
            except yaml.YAMLError as e:
                raise ConfigError(f"--include-path: {path}: invalid YAML: {e}") from None
            if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
                found.setdefault(cfg["task"], str(path.parent))
        if not any(Path(v).is_relative_to(folder) for v in found.values()):
            raise ConfigError(f"--include-path: {d} holds no lm-eval task YAML (a file with "
                              "'task: NAME')")
    return found


def _demo_specs(cfg, pm, registered: dict, asked: list[str]) -> set[str]:
    """Names of the benchmarks that come from a plugin's demo data: registered without --data
    but not with it (the plugin falls back to its demo split only when no data is given)."""
    import dataclasses
    with_data = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                  paths=["<your data>"]))
    try:
        again = pm.benchmarks(with_data)
    except Exception:  # a plugin that cannot register without reading the data: not demo
        return set()
    return {n for n, b in registered.items() if b.plugin in asked and n not in again}


def cmd_eval(args, pm=None, options=None) -> int:
    import dataclasses

    from .runner import EvalOptions, evaluate_models, finish_report, resolve_base_model
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

    summary: dict = {}
    for path in ([run_dir / "summary.json"] if run_dir else []) + (
            [Path(model_ref) / "sftctl_summary.json"] if local.exists() else []):
        if path.is_file():
            try:
                summary = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: invalid JSON: {e}") from None
            break

    if pm is None:
        raise ConfigError("sftctl eval needs the sftctl plugin manager (run it as `sftctl eval`)")
    options = options if options is not None else pm.config_options()
    cfg, asked = _eval_config(args, pm, options, run_dir, out_dir)
    args.quiet = bool(cfg.train.quiet)
    local_tasks = _include_tasks(args.include_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []

    def warn(msg: str) -> None:  # said even with --quiet: it changes what the numbers mean
        warnings.append(msg)
        print(f"[sftctl eval] WARNING: {msg}", file=sys.stderr, flush=True)

    # benchmarks: the run's, those of the asked plugins, the --include-path tasks; --tasks narrows
    try:
        known = {s.name: s for s in specs_from_json(summary.get("benchmarks"), "summary.json")}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    registered = pm.benchmarks(cfg)
    # an option whose plugin is neither asked for nor the run's is an error, as in train
    pm.check_benchmark_options(cfg, registered)
    demo = _demo_specs(cfg, pm, registered, asked) if asked else set()
    for name, s in registered.items():
        if s.plugin in asked:
            known[name] = s
    for name, folder in local_tasks.items():
        known[name] = BenchmarkSpec(name=name, include_path=folder,
                                    description=f"lm-eval task from {folder}")
    names = _split_names(cfg.eval.tasks)
    if not names and not local_tasks:
        names = list(known)
    elif not names:
        names = list(local_tasks)

    # the benchmark of the user's own data: --heldout, else the run's held-out records
    heldout = None
    if cfg.eval.heldout:
        heldout = {"source": f"--heldout {cfg.eval.heldout}", "paths": [cfg.eval.heldout],
                   "split": cfg.data.split}
    elif summary.get("heldout") and (not _split_names(cfg.eval.tasks) or {
            "heldout_generate", "heldout_nll"} & set(names)):
        heldout = summary["heldout"]
    heldout_specs_: list = []
    if heldout:
        from .user_tasks import GENERATE_TASK, NLL_TASK, heldout_specs

        try:
            heldout_specs_ = heldout_specs(heldout, cfg, pm, model_ref, out_dir, run_dir=run_dir,
                                           limit=cfg.eval.limit)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"--heldout: {e}") from None
        names = [n for n in names if n not in (GENERATE_TASK, NLL_TASK)]
    if not names and not heldout_specs_:
        raise ConfigError("no benchmarks to run: this checkpoint's run registered none; give "
                          "--tasks (lm-eval task names), --include-path DIR, --heldout FILE or "
                          "--plugin NAME")
    tasks = []
    for n in names:
        spec = known.get(n) or BenchmarkSpec(name=n, description="lm-eval task")
        if cfg.eval.limit is not None:
            spec = dataclasses.replace(spec, limit=min(cfg.eval.limit, spec.limit or cfg.eval.limit))
        if args.num_fewshot is not None:
            spec = dataclasses.replace(spec, num_fewshot=args.num_fewshot)
        if args.apply_chat_template:
            spec = dataclasses.replace(spec, apply_chat_template=True)
        tasks.append(spec)
    tasks += heldout_specs_

    # demo data on a checkpoint that was not trained on that demo: allowed (it is what was
    # asked for) but never silent
    data = summary.get("data") if isinstance(summary.get("data"), dict) else {}
    trained_on = set(data.get("train") or [])  # a demo run trained on "demo:FORMAT:train"
    formats = pm.dataset_formats()
    for spec in tasks:
        if spec.name in demo and not any(f"demo:{n}:train" in trained_on for n, f in
                                         formats.items() if f.plugin == spec.plugin):
            warn(f"{spec.name} (plugin {spec.plugin}) benchmarks the plugin's built-in DEMO data, "
                 f"not your data: {model_ref} was not trained on that demo. For your own "
                 "held-out records give --heldout FILE"
                 + (f" (or the plugin's own option, e.g. --{spec.plugin}-heldout FILE)"
                    if f"{spec.plugin}.heldout" in options else ""))

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

    device = cfg.train.device
    opts = EvalOptions(batch_size=args.batch_size, device=None if device == "auto" else device,
                       dtype=args.dtype, quiet=bool(cfg.train.quiet), threads=cfg.train.threads,
                       online=args.online)
    try:
        manifest = evaluate_models(models, tasks, out_dir, opts, warnings=warnings)
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
