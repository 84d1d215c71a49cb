"""Post-training benchmarks: lm-eval on the base model and on the SFT checkpoint.

Entry points: :func:`run_post_train` (after ``sftctl train``), :func:`evaluate_models` (used by
``sftctl eval``), and the worker (``python -m sftctl.evals.runner --worker JOB.json``).

Design choices
- One subprocess per model. Training memory (model, optimizer, CUDA caches) is freed by the OS no
  matter what the trainer left behind, and the worker's environment carries the offline switches
  (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``) from its first line,
  before any Hugging Face import (``EvalOptions.online``, ``sftctl eval --online``, lifts them for
  that evaluation only). A crashed or killed worker loses nothing already finished.
- Inside a worker the model is loaded once as lm-eval's ``hf`` model (what
  ``simple_evaluate(model="hf", model_args=...)`` builds, with one tokenization fix for
  log-likelihood requests, see :func:`_hf_model_class`) and every benchmark is a separate
  ``simple_evaluate`` call in its own ``try``: one failing benchmark is recorded with its error and
  traceback, and the others still run. The exit status says whether any benchmark failed.
- Task lookup is offline and cheap: a ``TaskManager`` over the plugins' include paths with
  ``include_defaults=False``; lm-eval's built-in index (~14k tasks, several seconds) is built only
  when a standard task name is asked for. A built-in task whose data is not in the local cache
  fails with a message that says so.
- lm-eval's own ``EvaluationTracker`` writes the results file and the per-sample logs
  (``log_samples=True``) into ``eval/<model>/<task>/``; the report reads those files, so every
  number in the report can be traced to lm-eval's output. ``eval/manifest.json`` lists what ran,
  where its files are, and each failure.
- Progress: the worker prints one line per benchmark and lm-eval's request progress bars
  (``Running generate_until requests``); its logging goes to ``eval/<model>/lm_eval.log``.
  ``quiet`` sends everything to the log and disables the bars.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .spec import BenchmarkSpec, check_task_files, specs_from_json

__all__ = ["EvalOptions", "evaluate_models", "run_post_train", "OFFLINE_ENV",
           "EXIT_OK", "EXIT_BENCHMARK_FAILED", "EXIT_REPORT_FAILED", "EXIT_GATE_FAILED",
           "MANIFEST_SCHEMA"]

EXIT_OK = 0
EXIT_BENCHMARK_FAILED = 3   # evaluation ran, at least one benchmark (model x task) failed
EXIT_REPORT_FAILED = 4      # benchmarks ran but the report could not be written
EXIT_GATE_FAILED = 5        # a --require gate failed (model, summary, report all written)
MANIFEST_SCHEMA = 1

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_EVALUATE_OFFLINE": "1",
}


_DIST_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
             "MASTER_PORT"}


@dataclass
class EvalOptions:
    """How to evaluate (the same for every model and benchmark of one call)."""

    batch_size: int = 16
    device: str | None = None        # None: cuda if available, else cpu
    dtype: str | None = None         # None: float32 on cpu, the checkpoint's dtype on cuda
    limit: int | None = None         # cap on documents per task (min with the spec's own limit)
    bootstrap_iters: int = 1000      # lm-eval's bootstrap for stderr of non-mean metrics
    quiet: bool = False
    timeout_s: float | None = None   # per model worker
    threads: int | None = None       # torch CPU threads in the worker (None: torch's choice)
    online: bool = False             # True: the worker is not forced offline (downloads allowed)

    @classmethod
    def from_cfg(cls, cfg: Any) -> EvalOptions:
        """Options from a ``RunConfig`` (``train.device``, ``train.quiet``); None: defaults."""
        if cfg is None:
            return cls()
        train = getattr(cfg, "train", None)
        device = getattr(train, "device", None)
        return cls(device=None if device in (None, "auto") else device,
                   quiet=bool(getattr(train, "quiet", False)),
                   threads=getattr(train, "threads", None))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _lm_eval_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("lm_eval")
    except Exception:
        return None


def _is_local_model(ref: str) -> bool:
    return Path(ref).expanduser().exists()


# --------------------------------------------------------------------------------------- parent


def evaluate_models(models: dict[str, str], specs: list[BenchmarkSpec], out_dir: str | Path,
                    options: EvalOptions | None = None, warnings: list[str] | None = None) -> dict:
    """Run every spec on every model (label -> path or hub id); write ``out_dir/eval/``.

    ``warnings``: said by the caller already; kept in the manifest so the report shows them.

    Returns the manifest (also written to ``out_dir/eval/manifest.json``). Each
    ``manifest["runs"][label][task]["status"]`` is ``"ok"`` or ``"error"``.
    """
    options = options or EvalOptions()
    if not specs:
        raise ValueError("no benchmarks to run: no plugin registered any, and no --tasks given")
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"benchmark(s) registered twice: {dup}")
    for spec in specs:  # a broken registration is an error before any model is loaded
        check_task_files(spec)
    eval_dir = Path(out_dir).resolve() / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "schema_version": MANIFEST_SCHEMA,
        "created": _now(),
        "lm_eval_version": _lm_eval_version(),
        "models": {},
        "tasks": [s.to_dict() for s in specs],
        "options": asdict(options),
        "warnings": list(warnings or []),
        "runs": {},
    }
    if options.online and not options.quiet:
        still = [k for k in OFFLINE_ENV if os.environ.get(k, "") not in ("", "0")]
        print("[sftctl eval] --online: downloads allowed for this evaluation (the worker is not "
              "forced offline)" + (f"; your environment still sets {', '.join(still)}"
                                   if still else ""), file=sys.stderr, flush=True)
    for i, (label, ref) in enumerate(models.items(), 1):
        ref = str(Path(ref).expanduser().resolve()) if _is_local_model(str(ref)) else str(ref)
        manifest["models"][label] = {"path": ref, "local": _is_local_model(ref)}
        if not options.quiet:
            print(f"[sftctl eval] model {i}/{len(models)}: {label} = {ref}", file=sys.stderr,
                  flush=True)
        manifest["runs"][label] = _run_worker(label, ref, specs, eval_dir, options)
        manifest["models"][label].update(manifest["runs"][label].pop("_model", {}))
    (eval_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    if not options.quiet:
        _print_summary(manifest)
    return manifest


def _run_worker(label: str, ref: str, specs: list[BenchmarkSpec], eval_dir: Path,
                options: EvalOptions) -> dict:
    model_dir = eval_dir / label
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model_info.json").unlink(missing_ok=True)
    for spec in specs:  # stale results of an earlier evaluation must not be picked up
        task_dir = model_dir / spec.name
        if task_dir.is_dir():
            for f in task_dir.iterdir():
                if f.is_file():
                    f.unlink()
    job = {"label": label, "model": ref, "out_dir": str(model_dir),
           "specs": [s.to_dict() for s in specs], "options": asdict(options)}
    job_path = model_dir / "job.json"
    job_path.write_text(json.dumps(job, indent=2), encoding="utf-8")
    log_path = model_dir / "lm_eval.log"      # the worker's logging (lm-eval, transformers)
    out_path = model_dir / "worker_output.log"  # its terminal output when quiet
    # The worker is one plain process: a torchrun parent's rendezvous variables would make
    # lm-eval (through accelerate) try to join the training's process group.
    env = {k: v for k, v in os.environ.items()
           if k not in _DIST_ENV and not k.startswith(("TORCHELASTIC_", "TORCHRUN_"))}
    if not options.online:
        env.update(OFFLINE_ENV)
    if options.quiet:
        env["TQDM_DISABLE"] = "1"
    cmd = [sys.executable, "-m", "sftctl.evals.runner", "--worker", str(job_path)]
    t0 = time.time()
    rc: int | str
    out = out_path.open("w", encoding="utf-8") if options.quiet else None
    try:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                              timeout=options.timeout_s, check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = f"timeout after {options.timeout_s} s"
    finally:
        if out is not None:
            out.close()
    runs: dict[str, Any] = {}
    model_info_path = model_dir / "model_info.json"
    if model_info_path.is_file():
        runs["_model"] = json.loads(model_info_path.read_text(encoding="utf-8"))
    for spec in specs:
        status_path = model_dir / spec.name / "status.json"
        if status_path.is_file():
            st = json.loads(status_path.read_text(encoding="utf-8"))
        else:
            st = {"status": "error",
                  "error": f"the evaluation worker for {label!r} ended (exit status {rc}) before "
                           f"finishing this benchmark; see {log_path}",
                  "traceback": None}
        for key in ("results_file", "samples_file"):
            if st.get(key):  # relative to the run dir's eval/ so the run dir can move
                st[key] = os.path.relpath(st[key], eval_dir)
        st["log"] = os.path.relpath(log_path, eval_dir)
        runs[spec.name] = st
    runs["_worker"] = {"exit_status": rc, "wall_time_s": round(time.time() - t0, 3)}
    return runs


def _print_summary(manifest: dict) -> None:
    failed = [(label, task, st["error"]) for label, runs in manifest["runs"].items()
              for task, st in runs.items() if not task.startswith("_") and st["status"] != "ok"]
    n = sum(1 for runs in manifest["runs"].values() for t in runs if not t.startswith("_"))
    print(f"[sftctl eval] {n - len(failed)}/{n} benchmark runs succeeded", file=sys.stderr)
    for label, task, err in failed:
        print(f"[sftctl eval] FAILED {label} / {task}: {err}", file=sys.stderr)


def manifest_failed(manifest: dict) -> list[tuple[str, str]]:
    return [(label, task) for label, runs in manifest["runs"].items()
            for task, st in runs.items() if not task.startswith("_") and st["status"] != "ok"]


def _read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {run_dir} an sftctl run directory?)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return summary


def resolve_base_model(run_dir: Path, summary: dict) -> str | None:
    """The model training started from: ``summary['base_model']`` (a path, relative paths taken
    against the run dir, or a hub id served from the local cache), else ``run_dir/base``."""
    base = summary.get("base_model")
    if base:
        p = Path(str(base)).expanduser()
        if not p.is_absolute() and (run_dir / p).exists():
            p = run_dir / p
        return str(p.resolve()) if p.exists() else str(base)
    if (run_dir / "base" / "config.json").is_file():
        return str((run_dir / "base").resolve())
    return None


def load_run_config(run_dir: Path, plugins: list[str] | None = None) -> tuple[Any, Any]:
    """``(RunConfig, plugin manager)`` rebuilt from ``run_dir/config.yaml`` (the resolved config
    the trainer wrote), with the run's plugins (plus ``plugins``) loaded."""
    from sftctl.run.config import build_config, load_yaml
    from sftctl.run.plugin_manager import get_plugin_manager

    path = run_dir / "config.yaml"
    data = load_yaml(path)
    wanted = list(dict.fromkeys([*(data.get("plugins") or []), *(plugins or [])]))
    pm = get_plugin_manager(wanted)
    if plugins:
        data = {**data, "plugins": wanted}
    return build_config([(str(path), data)], pm.config_options()), pm


def gather_tasks(cfg: Any, pm: Any, names: list[str] | None = None,
                 limit: int | None = None) -> list[BenchmarkSpec]:
    """The benchmarks to run: those the plugins register for ``cfg`` (all of them, or ``names``,
    default ``cfg.eval.tasks``); a name that no plugin registers is taken as a standard lm-eval
    task. ``limit`` (default ``cfg.eval.limit``) caps the documents of every task."""
    import dataclasses
    registered = pm.benchmarks(cfg) if pm is not None else {}
    eval_cfg = getattr(cfg, "eval", None)
    enabled = set(getattr(cfg, "plugins", None) or [])
    names = names or list(getattr(eval_cfg, "tasks", None) or []) or [
        n for n, b in registered.items() if not enabled or b.plugin in enabled]
    if limit is None:
        limit = getattr(eval_cfg, "limit", None)
    chosen = [registered[n] if n in registered else BenchmarkSpec(name=n, description="lm-eval task")
              for n in names]
    if limit is not None:
        chosen = [dataclasses.replace(s, limit=min(limit, s.limit or limit)) for s in chosen]
    return chosen


def run_post_train(run_dir: str | Path, cfg: Any = None, pm: Any = None) -> int:
    """Benchmark ``run_dir/model`` and its base model, then write the report.

    Benchmarks: ``summary.json``'s ``benchmarks`` (what the trainer resolved from the
    ``sftctl_register_benchmarks`` hook, ``eval.tasks`` and ``eval.limit``); when summary.json has
    no such key, the plugins are asked again with ``cfg`` (default: ``run_dir/config.yaml``).
    ``pm`` (the plugin manager) also supplies report sections. Returns 0,
    ``EXIT_BENCHMARK_FAILED`` or ``EXIT_REPORT_FAILED``.
    """
    run_dir = Path(run_dir).resolve()
    summary = _read_summary(run_dir)
    if cfg is not None and _steers(cfg):
        # --benchmark-every/--select-best: the final model's point of the series, model/ made
        # the best model, before the full benchmark describes model/ (steering.py)
        from .steering import finish_series

        finish_series(run_dir, cfg, quiet=bool(cfg.train.quiet))
    if "benchmarks" in summary:
        tasks = specs_from_json(summary["benchmarks"], where=f"{run_dir / 'summary.json'}: benchmarks")
    else:
        if cfg is None or pm is None:
            loaded_cfg, loaded_pm = load_run_config(run_dir)
            cfg = cfg if cfg is not None else loaded_cfg
            pm = pm if pm is not None else loaded_pm
        tasks = gather_tasks(cfg, pm)
    options = EvalOptions.from_cfg(cfg)
    heldout_failed = False
    if summary.get("heldout"):  # the benchmark of the user's own data (user_tasks.py)
        try:
            if cfg is None or pm is None:
                loaded_cfg, loaded_pm = load_run_config(run_dir)
                cfg = cfg if cfg is not None else loaded_cfg
                pm = pm if pm is not None else loaded_pm
            from .user_tasks import heldout_specs

            names = {t.name for t in tasks}
            tasks += [s for s in heldout_specs(summary["heldout"], cfg, pm,
                                               str(run_dir / "model"), run_dir, run_dir=run_dir)
                      if s.name not in names]
        except Exception as e:  # the trained run stays complete; the report says what failed
            heldout_failed = True
            print(f"[sftctl eval] cannot build the benchmark of your held-out data "
                  f"({summary['heldout'].get('source')}): {e}", file=sys.stderr)
    models = {}
    base = resolve_base_model(run_dir, summary)
    if base is not None:
        models["base"] = base
    elif not options.quiet:
        print("[sftctl eval] no base model recorded in summary.json: evaluating the SFT "
              "checkpoint only", file=sys.stderr)
    models["sft"] = str(run_dir / "model")
    manifest = None
    if not tasks:
        print("[sftctl eval] no benchmark registered (no enabled plugin provides one): nothing "
              "to evaluate; the report has no benchmark table", file=sys.stderr)
        gates = _gates(run_dir, cfg)
        rc = finish_report(run_dir, pm, manifest, options)
        return gates or (EXIT_BENCHMARK_FAILED if heldout_failed and rc == EXIT_OK else rc)
    try:
        manifest = evaluate_models(models, tasks, run_dir, options)
    except ValueError as e:  # a broken registration: the trained run itself stays complete
        print(f"[sftctl eval] cannot evaluate: {e}", file=sys.stderr)
        gates = _gates(run_dir, cfg)
        rc = finish_report(run_dir, pm, None, options)
        return gates or (rc if rc != EXIT_OK else EXIT_BENCHMARK_FAILED)
    gates = _gates(run_dir, cfg)
    rc = finish_report(run_dir, pm, manifest, options)
    rc = EXIT_BENCHMARK_FAILED if heldout_failed and rc == EXIT_OK else rc
    return gates or rc


def _steers(cfg: Any) -> bool:
    ec = getattr(cfg, "eval", None)
    return bool(getattr(ec, "benchmark_every", 0) or getattr(ec, "select_best", None)
                or getattr(ec, "require", None))


def _gates(run_dir: Path, cfg: Any) -> int:
    """The --require gates on the final benchmark (before the report, which shows them):
    0, EXIT_GATE_FAILED or EXIT_GATE_INVALID; a failed gate outranks a failed benchmark."""
    if cfg is None or not getattr(getattr(cfg, "eval", None), "require", None):
        return EXIT_OK
    from .steering import check_gates

    return check_gates(run_dir, cfg)


def finish_report(run_dir: Path, pm: Any, manifest: dict | None, options: EvalOptions) -> int:
    """Write the report; the exit status of the whole evaluation step."""
    from .report import write_report
    try:
        paths = write_report(run_dir, pm=pm)
    except Exception:
        traceback.print_exc()
        print(f"[sftctl eval] the report for {run_dir} could not be written", file=sys.stderr)
        return EXIT_REPORT_FAILED
    if not options.quiet:
        print(f"[sftctl eval] report: {paths['html']}", file=sys.stderr)
    if manifest is not None and manifest_failed(manifest):
        return EXIT_BENCHMARK_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------------------- worker


class BenchmarkError(RuntimeError):
    """A benchmark could not run; the message says why in the user's terms."""


def _explain(spec: BenchmarkSpec, exc: BaseException, known: list[str]) -> str:
    """Turn lm-eval/datasets errors into messages that name the task and what to do."""
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, KeyError) and "not a registered task" in str(exc):
        import difflib
        close = difflib.get_close_matches(spec.name, known, n=5)
        where = (f"the task folder {spec.include_path}" if spec.include_path
                 else "lm-eval's built-in tasks or the plugins' task folders")
        return (f"unknown lm-eval task {spec.name!r}: not found in {where}"
                + (f"; close matches: {close}" if close else ""))
    if "OfflineModeIsEnabled" in msg or (
            "offline" in msg.lower() and isinstance(exc, (ConnectionError, OSError))):
        return (f"lm-eval task {spec.name!r} needs data that is not in the local Hugging Face "
                f"cache, and sftctl evaluates offline (HF_DATASETS_OFFLINE=1): {exc}. Put the data "
                "set into the cache (HF_HOME) beforehand, register a local task YAML "
                "(--include-path), or pass --online to allow downloads.")
    return msg


def _setup_worker_logging(log_path: Path) -> None:
    import logging
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "evaluate"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    try:
        import transformers
        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
    except Exception:  # pragma: no cover - transformers is a hard dependency
        pass
    try:
        import datasets
        datasets.utils.logging.disable_propagation()
        datasets.utils.logging.get_logger().handlers[:] = [handler]
        datasets.disable_progress_bars()  # "Generating test split" bars are noise here
    except Exception:  # pragma: no cover
        pass


def _pick_device(opt: str | None) -> str:
    if opt:
        return opt
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _fmt_metrics(results: dict, task: str) -> str:
    r = results.get("results", {}).get(task, {})
    parts = []
    for k, v in r.items():
        if "," not in k or "_stderr" in k or not isinstance(v, (int, float)):
            continue
        se = r.get(k.replace(",", "_stderr,", 1))
        metric = k.split(",")[0]
        parts.append(f"{metric}={v:.4f}" + (f" ±{se:.4f}" if isinstance(se, (int, float)) else ""))
    return " ".join(parts)


def _hf_model_class():
    """lm-eval's ``hf`` model with one change in how a log-likelihood request is tokenized.

    lm-eval moves the context's trailing whitespace into the continuation before tokenizing
    (``_encode_pair``), then splits the whole sequence at the length of the re-tokenized context.
    When a tokenizer has tokens that contain that whitespace (sftctl's demo tokenizer has a single
    token for ``"\n\n### Response:\n"``), the split lands inside the prompt and the scored
    continuation loses tokens or is empty. Here the context is kept whole whenever its tokens are
    a prefix of the tokens of context + continuation (the continuation then gets exactly the
    tokens the model was trained to produce); otherwise lm-eval's own rule applies unchanged.
    Contexts without trailing whitespace tokenize identically under both rules.
    """
    from lm_eval.models.huggingface import HFLM

    class SftctlHFLM(HFLM):
        def _encode_pair(self, context: str, continuation: str):
            if context and context != context.rstrip() and self.backend == "causal":
                whole = self.tok_encode(context + continuation)
                ctx = self.tok_encode(context)
                if len(ctx) < len(whole) and whole[:len(ctx)] == ctx:
                    return ctx, whole[len(ctx):]
            return super()._encode_pair(context, continuation)

    return SftctlHFLM


def _quiet_git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                             check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class _Worker:
    """One evaluation worker: a job (model, benchmarks, options) read from JSON; its steps are
    load the model, then run each benchmark and record its status (one failure does not stop
    the others)."""

    def __init__(self, job: dict):
        self.label, self.model_ref = job["label"], job["model"]
        self.out_dir = Path(job["out_dir"])
        self.opts = EvalOptions(**job["options"])
        self.specs = [BenchmarkSpec.from_dict(d) for d in job["specs"]]
        self._managers: dict[bool, Any] = {}

    def say(self, msg: str) -> None:
        print(f"[sftctl eval] {self.label}: {msg}", file=sys.stderr, flush=True)

    def record(self, spec: BenchmarkSpec, status: dict) -> None:
        d = self.out_dir / spec.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "status.json").write_text(json.dumps(status, indent=2) + "\n", encoding="utf-8")

    def load_model(self):
        """lm-eval's ``hf`` model (with sftctl's tokenization fix), or None after recording
        the load error for every benchmark."""
        device = _pick_device(self.opts.device)
        dtype = self.opts.dtype or ("float32" if device == "cpu" else "auto")
        model_args = {"pretrained": self.model_ref, "dtype": dtype, "trust_remote_code": False}
        self.model_args = model_args
        t0 = time.time()
        try:
            lm = _hf_model_class().create_from_arg_obj(
                model_args, {"batch_size": self.opts.batch_size, "device": device,
                             "max_batch_size": None})
        except Exception as exc:
            tb = traceback.format_exc()
            where = "" if _is_local_model(self.model_ref) else (
                " (not a local directory; as a hub id it must already be in the local cache, "
                "since evaluation runs offline)")
            from sftctl.training.model import explain_load_error

            # transformers' "pass trust_remote_code=True" / "install sentencepiece" would send
            # the user the wrong way: name the directory and what it needs instead
            why = explain_load_error(exc, self.model_ref, "model", "sftctl eval does not run "
                                     "it (lm-eval loads models with trust_remote_code=False)")
            err = f"cannot load model {self.model_ref!r}{where}: " + (
                why or f"{type(exc).__name__}: {exc}")
            self.say(err)
            for spec in self.specs:
                self.record(spec, {"status": "error", "error": err, "traceback": tb,
                                   "wall_time_s": 0.0})
            return None
        (self.out_dir / "model_info.json").write_text(json.dumps({
            "model_args": model_args, "device": device, "batch_size": self.opts.batch_size,
            "lm_eval_model": "hf (sftctl: context kept whole at a clean token boundary)",
            "threads": _torch_threads(),
            "offline_env": {k: os.environ.get(k) for k in OFFLINE_ENV},
            "load_time_s": round(time.time() - t0, 3),
            "num_parameters": getattr(lm, "_model", None) and sum(
                p.numel() for p in lm._model.parameters()),
        }, indent=2) + "\n", encoding="utf-8")
        return lm

    def task_manager(self, builtin: bool):
        """A TaskManager over the plugins' task folders; lm-eval's built-in index (slow) only
        when a standard task is asked for."""
        from lm_eval.tasks import TaskManager

        if builtin not in self._managers:
            if builtin:
                self.say("building lm-eval's built-in task index (a standard task was asked for)")
            local_paths = sorted({s.include_path for s in self.specs if s.include_path})
            self._managers[builtin] = TaskManager(include_path=local_paths or None,
                                                  include_defaults=builtin)
        return self._managers[builtin]

    def run_benchmark(self, lm, spec: BenchmarkSpec) -> tuple[dict, str]:
        """One ``simple_evaluate`` call whose results and samples lm-eval's own tracker writes;
        returns (status, one-line summary). Raises on failure."""
        import lm_eval
        from lm_eval.loggers import EvaluationTracker

        t = time.time()
        tm = self.task_manager(spec.builtin)
        limits = [x for x in (spec.limit, self.opts.limit) if x is not None]
        task_dir = self.out_dir / spec.name
        task_dir.mkdir(parents=True, exist_ok=True)
        tracker = EvaluationTracker(output_path=str(task_dir / "results.json"))
        if spec.apply_chat_template:
            self.ensure_chat_template(lm, spec)
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[spec.name], task_manager=tm,
            limit=min(limits) if limits else None, num_fewshot=spec.num_fewshot,
            log_samples=True, evaluation_tracker=tracker,
            bootstrap_iters=self.opts.bootstrap_iters,
            apply_chat_template=spec.apply_chat_template)
        if res is None:
            raise BenchmarkError("lm-eval returned no results (not rank 0?)")
        # the model went in as an object: lm-eval would record model "SftctlHFLM" with no
        # model_args; the results file names what `lm_eval --model hf --model_args ...` would
        res.setdefault("config", {}).update(model="hf", model_args=dict(self.model_args))
        gct = tracker.general_config_tracker
        gct.log_experiment_args(model_source="hf", model_args=dict(self.model_args),
                                system_instruction=gct.system_instruction,
                                chat_template=gct.chat_template,
                                fewshot_as_multiturn=bool(gct.fewshot_as_multiturn))
        samples = res.pop("samples", {}) or {}
        tracker.save_results_aggregated(results=res, samples=samples)
        for task_name in res.get("configs", {}):
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        # The tracker logs and swallows write errors; a missing file is a failure here.
        results_files = sorted(task_dir.glob("results_*.json"))
        sample_files = sorted(task_dir.glob("samples_*.jsonl"))
        if not results_files:
            raise BenchmarkError(f"lm-eval wrote no results file into {task_dir}")
        status = {"status": "ok", "error": None, "traceback": None,
                  "results_file": str(results_files[-1]),
                  "samples_file": str(sample_files[-1]) if sample_files else None,
                  "wall_time_s": round(time.time() - t, 3)}
        return status, f"{_fmt_metrics(res, spec.name)} ({status['wall_time_s']:.1f} s)"

    def ensure_chat_template(self, lm, spec: BenchmarkSpec) -> None:
        """A model whose tokenizer has no chat template gets the spec's (the one the SFT model
        was trained with), said in the output; with neither, the benchmark fails clearly."""
        tok = getattr(lm, "tokenizer", None)
        if tok is None or getattr(tok, "chat_template", None):
            return
        if not spec.chat_template:
            raise BenchmarkError(f"{spec.name} needs a chat template and {self.model_ref!r} has "
                                 "none")
        tok.chat_template = spec.chat_template
        self.say(f"{spec.name}: the tokenizer has no chat template; using the run's")

    def run(self) -> int:
        import lm_eval.evaluator

        # lm-eval records `git describe` of the working directory and lets git print "fatal:
        # not a git repository" on the terminal; same lookup, without the noise.
        lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash
        lm = self.load_model()
        if lm is None:
            return 1
        failed = 0
        for i, spec in enumerate(self.specs, 1):
            self.say(f"benchmark {i}/{len(self.specs)}: {spec.name}")
            t = time.time()
            try:
                status, line = self.run_benchmark(lm, spec)
                self.say(f"{spec.name}: {line}")
            except Exception as exc:
                failed += 1
                known = list(getattr(self._managers.get(spec.builtin), "all_tasks", []) or [])
                err = _explain(spec, exc, known)
                status = {"status": "error", "error": err, "traceback": traceback.format_exc(),
                          "wall_time_s": round(time.time() - t, 3)}
                self.say(f"{spec.name}: FAILED: {err}")
            self.record(spec, status)
        return 1 if failed else 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def worker_main(job_path: str) -> int:
    """The worker process: offline switches first (before lm_eval/transformers/datasets are
    imported), logging to the job's folder, then the job."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    if not job["options"].get("online"):
        for k, v in OFFLINE_ENV.items():
            os.environ.setdefault(k, v)
    if job["options"].get("threads"):
        import torch

        torch.set_num_threads(int(job["options"]["threads"]))
    worker = _Worker(job)
    (worker.out_dir / "lm_eval.log").write_text("", encoding="utf-8")
    _setup_worker_logging(worker.out_dir / "lm_eval.log")
    return worker.run()


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m sftctl.evals.runner",
                                description="sftctl evaluation worker (internal)")
    p.add_argument("--worker", required=True, metavar="JOB_JSON")
    args = p.parse_args(argv)
    return worker_main(args.worker)


if __name__ == "__main__":
    sys.exit(main())
