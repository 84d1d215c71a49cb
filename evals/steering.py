"""Evaluation that steers the run: ``--benchmark-every``, ``--select-best``, ``--require``.

- ``--benchmark-every N`` benchmarks the model at every N-th step during training on a capped
  subset of each benchmark (``--benchmark-limit K`` documents), records the scores per step in
  ``OUTPUT_DIR/eval/steps.json`` (and, after training, in summary.json and the report, which
  plots them against the step next to the loss); the trackers of ``--report-to`` read that file
  and log each point at its step (``benchmark_steps/<task>/<metric>``, sftctl.plugins.trackers).
- ``--select-best TASK:METRIC`` makes ``model/`` the best of those models (the benchmarked steps
  and the final model) by that score; the final model then moves to ``model_final/``.
- ``--require GATE`` (repeatable) checks the final benchmark (base vs SFT, all documents); a
  failed gate makes ``sftctl train`` exit with ``EXIT_GATE_FAILED`` (5) after everything
  (model, summary.json with the gate results, report) is written.

Design choices
- Where it runs: the trainer calls ``sftctl_checkpoint_saved`` after each periodic checkpoint;
  this plugin benchmarks there, on rank 0 only (the other ranks wait at their next collective).
  ``--benchmark-every N`` therefore needs a checkpoint at those steps: ``--save-every`` is set
  to N when it is 0, and must divide N otherwise (a config error before training).
- What is benchmarked: the in-memory model, written as a standard Hugging Face directory
  (``save_pretrained`` + tokenizer) into ``eval/steps/step-N/model`` (with ``--plugin lora``:
  the base with the adapters merged, as ``model/`` will be, computed by the lora plugin's
  ``merged_copy`` without touching the training weights) and evaluated by the same
  lm-eval worker subprocess as the final benchmark, so a step's numbers and the final ones come
  from one code path. The resumable checkpoint is not reused: its ``model.safetensors`` has
  sftctl's own layout (tied tensors once, aliases in the metadata) and no config or tokenizer.
  Running lm-eval inside the training process was rejected: generation there would switch the
  model's mode, draw from the RNGs, hold lm-eval's and the generation's memory next to the
  optimizer's and import lm-eval into the trainer. Cost per benchmarked step: one more write of
  the weights and one worker start (about 10 s on a CPU before any document). On a GPU the
  worker loads the model onto the run's device next to the training state (the weights once
  more, without gradients or optimizer state, plus lm-eval's batches); under torchrun
  a benchmarked step must end within the process group's timeout, since the other ranks wait.
- Training state untouched: the model is only read (``state_dict`` for the save); no forward,
  no ``train()``/``eval()`` switch, ``config.use_cache`` is restored; the RNG states (Python,
  NumPy, torch CPU and CUDA) are captured before and restored after anyway, so the losses of a
  run with ``--benchmark-every`` are bit-identical to those of the same run without it (tested).
- Like for like: the final model's point of the series is benchmarked after training with the
  same capped specs (the full final benchmark uses every document), so ``--select-best`` compares
  the same documents at every step. Ties go to the later step. Step model directories are
  deleted after their benchmark, except the best so far under ``--select-best``.
- ``--select-best`` is atomic: the final model is first copied to ``model_final/`` (an atomic
  directory), then ``model/`` is replaced by the selected weights through an atomic directory
  (written complete under a temporary name; the old one renamed aside, the new one renamed in,
  the old one deleted: never half-written, never a mix of two models), with the run's
  ``sftctl_config.yaml``/``sftctl_summary.json``/model card so ``model/`` stays a complete run
  model. The full benchmark and the gates then describe ``model/`` (what is shipped).
- Gate syntax: ``TASK:METRIC OP VALUE`` compares the SFT score, ``TASK:METRIC:delta OP VALUE``
  the SFT score minus the base score; OP is ``>=``, ``>``, ``<=`` or ``<``; METRIC may carry an
  lm-eval filter (``exact_match,strict-match``). Syntax, ``--no-eval`` and combinations are
  checked in ``sftctl_configure``; task names at ``sftctl_train_start`` (the benchmarks are
  known then: no step has run); a metric the task does not report at the first benchmarked
  step, or in the final benchmark, is an error naming the gate (exit 2, after writing
  everything when found after training). A gate that cannot be evaluated (its benchmark
  failed, no base model for a delta) fails.
- LoRA (``--plugin lora``, one process or DDP): ``save_pretrained`` of the peft model would
  write the adapter alone, and merging in place (what the final save does, training being
  over) would change the weights being trained; the lora plugin's ``merged_copy`` merges a
  skeleton fed the live state dict on the CPU with peft's safe merge (rsLoRA and DoRA handled
  by peft), so the step model is the standard checkpoint ``model/`` would be at that step.
- Not supported (an error before training): ``--strategy fsdp`` with ``--benchmark-every``
  (the weights are sharded over the ranks; gathering them on rank 0 at every benchmarked step
  is not done).
- The plugin manager reaches the checkpoint hook through ``sftctl_configure`` (the only
  lifecycle hook that receives it), kept per config object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import operator
import os
import random
import re
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("sftctl")

from .runner import EXIT_GATE_FAILED  # noqa: E402 (5: a --require gate failed)
EXIT_GATE_INVALID = 2   # a gate names a metric its benchmark does not report
STEPS_FILE = "steps.json"
STEPS_DIR = "steps"
EXTRAS_KEY = "evals.steering"

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_TARGET_RE = re.compile(r"^(?P<task>[A-Za-z0-9_][A-Za-z0-9_.\-]*):(?P<metric>[^:<>=\s]+)$")
_GATE_RE = re.compile(r"^\s*(?P<task>[A-Za-z0-9_][A-Za-z0-9_.\-]*):(?P<metric>[^:<>=\s]+)"
                      r"(?::(?P<kind>delta))?\s*(?P<op>>=|<=|>|<)\s*(?P<value>[^\s]+)\s*$")
GATE_SYNTAX = ("'TASK:METRIC>=VALUE' (the SFT score) or 'TASK:METRIC:delta>=VALUE' (SFT minus "
               "base); operators >=, >, <=, <")

_PMS: dict[int, Any] = {}  # id(run config) -> weak reference to its plugin manager


# ------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class Target:
    task: str
    metric: str

    @property
    def text(self) -> str:
        return f"{self.task}:{self.metric}"


@dataclass(frozen=True)
class Gate:
    text: str
    task: str
    metric: str
    kind: str    # "sft" (the SFT score) or "delta" (SFT minus base)
    op: str
    value: float

    def passes(self, x: float) -> bool:
        return bool(_OPS[self.op](x, self.value))


def _config_error(msg: str):
    from sftctl.errors import ConfigError

    return ConfigError(msg)


def parse_target(text: str, flag: str = "--select-best") -> Target:
    m = _TARGET_RE.match(str(text).strip())
    if not m:
        raise _config_error(f"{flag} {text!r}: expected TASK:METRIC (e.g. "
                            "heldout_generate:exact_match)")
    return Target(m["task"], m["metric"])


def parse_gate(text: str) -> Gate:
    m = _GATE_RE.match(str(text))
    if not m:
        raise _config_error(f"--require {text!r}: expected {GATE_SYNTAX}")
    try:
        value = float(m["value"])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _config_error(f"--require {text!r}: {m['value']!r} is not a finite number")
    return Gate(str(text).strip(), m["task"], m["metric"], m["kind"] or "sft", m["op"], value)


def metric_value(scores: dict[str, Any], metric: str) -> tuple[str | None, Any]:
    """(key, value) of ``metric`` among one task's ``{"metric" or "metric,filter": value}``: the
    exact key, else the only key of that metric name; (None, None) when unknown or ambiguous."""
    if metric in scores:
        return metric, scores[metric]
    keys = [k for k in scores if k.split(",", 1)[0] == metric]
    if len(keys) == 1:
        return keys[0], scores[keys[0]]
    return None, None


def _active(ec) -> bool:
    return bool(ec.benchmark_every or ec.select_best or ec.require)


# ------------------------------------------------------------------------------ before training


def configure(config, pm) -> None:
    """``sftctl_configure``: syntax and combinations, before any data or model is loaded."""
    ec = config.eval
    gates = [parse_gate(g) for g in ec.require]
    target = parse_target(ec.select_best) if ec.select_best else None
    if not _active(ec):
        return
    if not ec.enabled:
        used = [f for f, on in (("--benchmark-every", ec.benchmark_every),
                                ("--select-best", target), ("--require", gates)) if on]
        raise _config_error(f"{', '.join(used)}: need the benchmarks that --no-eval turns off; "
                            "drop --no-eval")
    if target is not None and not ec.benchmark_every:
        raise _config_error(f"--select-best {target.text}: chooses among the models benchmarked "
                            "during training; give --benchmark-every N")
    if ec.benchmark_every:
        every = ec.benchmark_every
        if config.train.strategy == "fsdp":
            raise _config_error("--benchmark-every with --strategy fsdp is not supported (the "
                                "weights are sharded over the ranks); use --strategy ddp")
        save = config.train.save_every
        if not save:
            config.train.save_every = every
            log.info("--benchmark-every %d: periodic checkpoints every %d steps (--save-every)",
                     every, every)
        elif every % save:
            raise _config_error(f"--benchmark-every {every} benchmarks the periodic checkpoints: "
                                f"it must be a multiple of --save-every ({save})")
    if pm is not None:
        _PMS[id(config)] = weakref.ref(pm)


def _task_error(flag: str, task: str, names: list[str]):
    known = ", ".join(names) if names else "none (no enabled plugin registers a benchmark)"
    return _config_error(f"{flag}: this run has no benchmark {task!r}; its benchmarks: {known}")


class Steering:
    """The per-run state on rank 0 (in ``run.extras``): specs, the series, the best so far."""

    def __init__(self, run, pm):
        self.run, self.pm = run, pm
        self.cfg = run.config
        self.ec = self.cfg.eval
        self.out = Path(run.output_dir).resolve()
        self.dir = self.out / "eval" / STEPS_DIR
        self.gates = [parse_gate(g) for g in self.ec.require]
        self.target = parse_target(self.ec.select_best) if self.ec.select_best else None
        self.specs: list = []
        self.points: list[dict] = []
        self.checked_metrics = False

    # -- setup (train_start)
    def prepare(self) -> None:
        from sftctl.training.trainer import heldout_record
        from types import SimpleNamespace

        cfg = self.cfg
        specs = list(self.pm.run_benchmarks(cfg)) if self.pm is not None else []
        held_path = self.out / "heldout.jsonl"
        held_records = held_path.read_text(encoding="utf-8").splitlines() \
            if held_path.is_file() else []
        held = heldout_record(cfg, SimpleNamespace(heldout=held_records))
        if held:
            from .user_tasks import heldout_specs

            tok_dir = self.dir / "tokenizer"
            tok_dir.mkdir(parents=True, exist_ok=True)
            self.run.tokenizer.save_pretrained(tok_dir)
            names = {s.name for s in specs}
            try:
                specs += [s for s in heldout_specs(held, cfg, self.pm, str(tok_dir), self.dir,
                                                   run_dir=self.out,
                                                   limit=self.ec.benchmark_limit)
                          if s.name not in names]
            except (ValueError, FileNotFoundError) as e:
                raise _config_error(f"the benchmark of your held-out data: {e}") from None
        names = [s.name for s in specs]
        if self.target is not None and self.target.task not in names:
            raise _task_error(f"--select-best {self.target.text}", self.target.task, names)
        for g in self.gates:
            if g.task not in names:
                raise _task_error(f"--require {g.text!r}", g.task, names)
        limit = self.ec.benchmark_limit
        self.specs = [dataclasses.replace(s, limit=min(limit, s.limit or limit)) for s in specs]
        if not self.ec.benchmark_every:
            return
        if not self.specs:
            raise _config_error("--benchmark-every: this run has no benchmark to run (no "
                                "enabled plugin registers one and no records are held out)")
        old = read_steps(self.out)
        # a resumed run keeps the points of the steps it already did; a new run starts empty
        self.points = [p for p in (old or {}).get("points", []) if p.get("step", 0) <= self.run.step
                       and p.get("model") == "checkpoint"] if self.run.resumed_from else []
        self.write()

    def write(self) -> None:
        from sftctl.training.atomic import write_json

        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir.parent / STEPS_FILE, {
            "benchmark_every": self.ec.benchmark_every, "limit": self.ec.benchmark_limit,
            "select_best": self.target.text if self.target else None,
            "specs": [s.to_dict() for s in self.specs], "points": self.points})

    # -- each benchmarked step (checkpoint_saved)
    def benchmark_step(self, step: int) -> dict:
        from sftctl.training.atomic import atomic_directory

        t0 = time.perf_counter()
        d = self.dir / f"step-{step:08d}"
        model = self.run.model
        with atomic_directory(d / "model") as tmp:
            if "lora" in (self.cfg.plugins or []):
                # the adapters merged into a copy of the base (the training weights untouched)
                from sftctl.plugins.lora import merged_copy

                merged = merged_copy(model, self.cfg)
                merged.config.use_cache = True  # as the final model is saved
                merged.save_pretrained(tmp, safe_serialization=True)
                del merged
            else:
                use_cache = getattr(model.config, "use_cache", None)
                model.config.use_cache = True  # as the final model is saved
                try:
                    model.save_pretrained(tmp, safe_serialization=True)
                finally:
                    model.config.use_cache = use_cache
            self.run.tokenizer.save_pretrained(tmp)
        point = evaluate_point(self.specs, d, d / "model", self.cfg, step, "checkpoint",
                               self.out)
        point["wall_time_s"] = round(time.perf_counter() - t0, 3)
        self.points.append(point)
        if not self.checked_metrics:
            self.check_metrics(point)
        best = best_point(self.points, self.target) if self.target else None
        _prune(self.dir, keep=best)  # only the best model so far (none without --select-best)
        self.write()
        log.info("step %d: benchmarked in %.1f s: %s", step, point["wall_time_s"],
                 format_scores(point, self.target))
        return point

    def check_metrics(self, point: dict) -> None:
        """A gate or --select-best metric its (successful) task does not report: an error now,
        not after the whole run."""
        wanted = ([(f"--select-best {self.target.text}", self.target.task, self.target.metric)]
                  if self.target else []) + [(f"--require {g.text!r}", g.task, g.metric)
                                             for g in self.gates]
        for flag, task, metric in wanted:
            scores = point["scores"].get(task)
            if scores is None:
                continue  # the benchmark failed at this step: checked at the next one
            if metric_value(scores, metric)[0] is None:
                raise _config_error(f"{flag}: benchmark {task!r} reports no metric {metric!r}; "
                                    f"its metrics: {', '.join(sorted(scores))}")
        self.checked_metrics = all(point["scores"].get(t) is not None for _, t, _ in wanted)


def evaluate_point(specs: list, where: Path, model_dir: Path, cfg, step: int, kind: str,
                   run_dir: Path) -> dict:
    """Benchmark ``model_dir`` with the capped ``specs`` into ``where/eval``; one series point:
    ``{"step", "model", "scores": {task: {metric: value}}, "higher_is_better", "errors"}``."""
    from .report import _metric_rows
    from .runner import EvalOptions, evaluate_models

    opts = EvalOptions.from_cfg(cfg)
    opts.quiet = True
    manifest = evaluate_models({"sft": str(model_dir)}, specs, where, opts)
    scores: dict[str, dict] = {}
    hib: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for s in specs:
        st = manifest["runs"]["sft"].get(s.name) or {"status": "error", "error": "not run"}
        res = None
        if st.get("status") == "ok":
            try:
                res = json.loads((where / "eval" / st["results_file"]).read_text(encoding="utf-8"))
            except (OSError, ValueError, KeyError) as e:
                st = {"error": f"results file unreadable: {e}"}
        if res is None:
            errors[s.name] = str(st.get("error"))
            continue
        scores[s.name] = {(m if f == "none" else f"{m},{f}"): v["value"]
                          for (m, f), v in _metric_rows(res, s.name).items()}
        hib[s.name] = {k: v for k, v in ((res.get("higher_is_better") or {}).get(s.name)
                                          or {}).items() if isinstance(v, bool)}
    return {"step": int(step), "model": kind, "scores": scores, "higher_is_better": hib,
            "errors": errors, "results": os.path.relpath(where / "eval", run_dir)}


def _higher_is_better(point: dict, target: Target) -> bool:
    key, _ = metric_value(point["scores"].get(target.task) or {}, target.metric)
    hib = (point.get("higher_is_better") or {}).get(target.task) or {}
    return hib.get((key or target.metric).split(",", 1)[0], True)


def best_point(points: list[dict], target: Target) -> dict | None:
    """The point with the best ``target`` score (ties: the later step); None when no point
    has that score."""
    scored = [(p, metric_value(p["scores"].get(target.task) or {}, target.metric)[1])
              for p in points]
    scored = [(p, v) for p, v in scored if isinstance(v, (int, float)) and math.isfinite(v)]
    if not scored:
        return None
    higher = _higher_is_better(scored[0][0], target)
    best = None
    for p, v in scored:  # in step order: >= lets the later step win a tie
        if best is None or (v >= best[1] if higher else v <= best[1]):
            best = (p, v)
    return best[0]


def format_scores(point: dict, target: Target | None) -> str:
    parts = []
    for task, scores in point["scores"].items():
        for k, v in scores.items():
            if target is not None and (task, k.split(",")[0]) != (target.task,
                                                                  target.metric.split(",")[0]):
                continue
            parts.append(f"{task}:{k}={'n/a' if v is None else f'{v:.4f}'}")
    parts += [f"{t}: FAILED" for t in point["errors"]]
    return ", ".join(parts[:8]) or "no scores"


def read_steps(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "eval" / STEPS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def rng_preserved():
    """Every RNG the training draws from comes back as it was (Python, NumPy, torch CPU and
    every CUDA device)."""
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------- hooks


def train_start(run) -> None:
    cfg = run.config
    if not _active(cfg.eval) or not run.is_main:
        return
    ref = _PMS.get(id(cfg))
    pm = ref() if ref is not None else None
    st = Steering(run, pm)
    st.prepare()
    run.extras[EXTRAS_KEY] = st


def checkpoint_saved(run, step: int, path) -> None:
    st = run.extras.get(EXTRAS_KEY)
    every = run.config.eval.benchmark_every
    if st is None or not every or step % every or not run.is_main:
        return
    with rng_preserved():
        st.benchmark_step(step)


# ------------------------------------------------------------------------------ after training


def _prune(steps_dir: Path, keep: dict | None) -> None:
    """Delete the step model directories except the one of ``keep`` (a point)."""
    for mdir in sorted(Path(steps_dir).glob("step-*/model")):
        if keep is None or mdir.parent.name != f"step-{keep['step']:08d}" \
                or keep.get("model") != "checkpoint":
            shutil.rmtree(mdir, ignore_errors=True)


def _copy_model(src: Path, dst_tmp: Path) -> None:
    for f in sorted(Path(src).iterdir()):
        if f.is_file():
            shutil.copy2(f, dst_tmp / f.name)
        elif f.is_dir():
            shutil.copytree(f, dst_tmp / f.name)


def finish_series(run_dir: Path, cfg, quiet: bool = False) -> dict | None:
    """After training, before the final benchmark: the final model's point of the series, then
    ``--select-best``. Returns summary.json's ``steering`` (also written there), or None when
    the run did not ask for any of it."""
    from sftctl.training.atomic import write_json

    ec = cfg.eval
    if not _active(ec):
        return None
    run_dir = Path(run_dir).resolve()
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    target = parse_target(ec.select_best) if ec.select_best else None
    steering: dict[str, Any] = {
        "benchmark_every": ec.benchmark_every or None, "benchmark_limit": ec.benchmark_limit,
        "select_best": target.text if target else None, "require": list(ec.require),
        "points": [], "selected": None, "gates": [], "gates_passed": None}
    data = read_steps(run_dir) if ec.benchmark_every else None
    if data is not None:
        from .spec import specs_from_json

        specs = specs_from_json(data.get("specs"), "eval/steps.json: specs")
        points = [p for p in data.get("points", []) if p.get("model") == "checkpoint"]
        final_step = int(summary.get("steps") or 0)
        t0 = time.perf_counter()
        final = evaluate_point(specs, run_dir / "eval" / STEPS_DIR / "final", run_dir / "model",
                               cfg, final_step, "final", run_dir)
        final["wall_time_s"] = round(time.perf_counter() - t0, 3)
        points.append(final)
        if not quiet:
            log.info("final model (step %d): benchmarked on the --benchmark-limit subset: %s",
                     final_step, format_scores(final, target))
        steering["points"] = points
        if target is not None:
            steering["selected"] = _select(run_dir, points, target, final, summary)
        data["points"] = points
        write_json(run_dir / "eval" / STEPS_FILE, data)
    summary["steering"] = steering
    write_json(run_dir / "summary.json", summary)
    return steering


def _select(run_dir: Path, points: list[dict], target: Target, final: dict,
            summary: dict) -> dict:
    from sftctl.training.atomic import atomic_directory

    best = best_point(points, target)
    if best is None:
        log.warning("--select-best %s: no benchmarked model has that score (the benchmark "
                    "failed); model/ stays the final model", target.text)
        return {"task": target.task, "metric": target.metric, "step": None, "score": None,
                "model": "final", "final_dir": None, "higher_is_better": None,
                "reason": "no benchmarked model has that score"}
    key, score = metric_value(best["scores"][target.task], target.metric)
    sel = {"task": target.task, "metric": key, "step": best["step"], "score": score,
           "model": best["model"], "higher_is_better": _higher_is_better(best, target),
           "final_dir": None, "final_score": metric_value(
               final["scores"].get(target.task) or {}, target.metric)[1]}
    if best is final:
        _prune(run_dir / "eval" / STEPS_DIR, keep=None)
        log.info("--select-best %s: the final model is the best (%s = %.4f); model/ is "
                 "unchanged", target.text, key, score)
        return sel
    src = run_dir / "eval" / STEPS_DIR / f"step-{best['step']:08d}" / "model"
    if not (src / "config.json").is_file():
        raise RuntimeError(f"--select-best: the model of step {best['step']} is missing ({src})")
    model, keep = run_dir / "model", run_dir / "model_final"
    # 1. the final model, complete, under model_final/ (atomic directory)
    with atomic_directory(keep) as tmp:
        _copy_model(model, tmp)
    # 2. model/ replaced by the selected weights in one rename (the old one is deleted after)
    with atomic_directory(model) as tmp:
        _copy_model(src, tmp)
        for name in ("sftctl_config.yaml", "README.md"):
            if (keep / name).is_file():
                shutil.copy2(keep / name, tmp / name)
        inner = json.loads((keep / "sftctl_summary.json").read_text(encoding="utf-8")) \
            if (keep / "sftctl_summary.json").is_file() else dict(summary)
        inner["selected"] = {k: sel[k] for k in ("task", "metric", "step", "score")}
        (tmp / "sftctl_summary.json").write_text(json.dumps(inner, indent=2, default=str,
                                                            allow_nan=False) + "\n",
                                                 encoding="utf-8")
    _prune(run_dir / "eval" / STEPS_DIR, keep=None)
    sel["final_dir"] = "model_final"
    log.info("--select-best %s: model/ is now step %d (%s = %.4f; the final model scored "
             "%s, kept in model_final/)", target.text, best["step"], key, score,
             "n/a" if sel["final_score"] is None else f"{sel['final_score']:.4f}")
    return sel


def check_gates(run_dir: Path, cfg) -> int:
    """After the final benchmark, before the report: each ``--require`` gate on the report's
    table (SFT and base, all documents); the results go into summary.json's ``steering``.
    Returns 0, ``EXIT_GATE_FAILED`` or ``EXIT_GATE_INVALID``."""
    from sftctl.training.atomic import write_json

    from .report import _benchmarks

    ec = cfg.eval
    if not ec.require:
        return 0
    run_dir = Path(run_dir).resolve()
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    steering = summary.get("steering") or {}
    bench, _ = _benchmarks(run_dir, [])
    table = (bench or {}).get("table") or []
    results, invalid = [], False
    for g in (parse_gate(t) for t in ec.require):
        rows = [r for r in table if r["task"] == g.task]
        by_key = {(r["metric"] if r["filter"] == "none" else f"{r['metric']},{r['filter']}"): r
                  for r in rows}
        key, row = metric_value(by_key, g.metric)
        res = {"gate": g.text, "task": g.task, "metric": key or g.metric, "kind": g.kind,
               "op": g.op, "threshold": g.value, "value": None, "sft": None, "base": None,
               "passed": False, "error": None}
        failed_run = rows and all((r.get("status") or {}).get("sft") != "ok" for r in rows)
        if not rows or failed_run:
            res["error"] = f"benchmark {g.task!r} " + ("failed" if failed_run else "did not run")
        elif row is None:
            invalid = True
            res["error"] = (f"--require {g.text!r}: benchmark {g.task!r} reports no metric "
                            f"{g.metric!r}; its metrics: {', '.join(sorted(by_key))}")
        else:
            res["sft"], res["base"] = row.get("sft"), row.get("base")
            value = row.get("delta") if g.kind == "delta" else row.get("sft")
            if value is None:
                res["error"] = ("no base score to take the delta from" if g.kind == "delta"
                                else "no SFT score")
            else:
                res["value"] = value
                res["passed"] = g.passes(value)
        results.append(res)
        state = "passed" if res["passed"] else "FAILED"
        shown = "n/a" if res["value"] is None else f"{res['value']:.4f}"
        msg = f"gate {g.text}: {state} ({g.kind} {shown})" + (
            f": {res['error']}" if res["error"] else "")
        (log.info if res["passed"] else log.error)("%s", msg)
    steering["gates"] = results
    steering["gates_passed"] = all(r["passed"] for r in results)
    summary["steering"] = steering
    write_json(run_dir / "summary.json", summary)
    if invalid:
        return EXIT_GATE_INVALID
    return 0 if steering["gates_passed"] else EXIT_GATE_FAILED


__all__ = ["Gate", "Target", "parse_gate", "parse_target", "configure", "train_start",
           "checkpoint_saved", "finish_series", "check_gates", "best_point", "metric_value",
           "EXIT_GATE_FAILED", "EXIT_GATE_INVALID", "rng_preserved"]
