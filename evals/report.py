"""The run report: report.json, report.md and a self-contained report.html, from the run dir alone.

``write_report(run_dir)`` reads what the trainer and the evaluation left in the run directory
(``summary.json``, ``config.yaml``, ``metrics.jsonl``, ``eval/manifest.json`` and lm-eval's own
results and sample files) and writes:

- ``report.json``: everything, machine-readable, with ``schema_version``;
- ``report.md``: the same for people, plots as ``report_assets/*.png``;
- ``report.html``: one file that opens offline: CSS inline, plots embedded as base64 PNG, no
  script, no external asset.

Design choices
- Every benchmark figure is read from lm-eval's results file (``results[task]["metric,filter"]``
  and its ``_stderr`` twin), never recomputed, so the report agrees with lm-eval by construction;
  the delta is SFT minus base. Non-numeric stderr (lm-eval's "N/A") becomes null.
- Side-by-side generations come from lm-eval's logged samples (``log_samples=True``) of every
  ``generate_until`` task, joined on ``doc_id``.
- Plots use matplotlib's Agg backend (no display) and are deterministic PNGs.
- Nothing is dropped silently: unreadable metrics lines, missing files and failing report hooks
  are listed under ``warnings`` (shown in every format) and failed benchmarks under
  ``benchmarks.errors`` with their message and traceback.
- Plugins add sections through ``sftctl_report_sections(run_dir, report)``; each plugin's
  implementation is called on its own so one failing plugin is named and the others still appear.
- HTML is produced by a Jinja2 template with autoescaping; plugin markdown is converted by a small
  escaping converter (headings, lists, code, tables, emphasis), plugin ``html`` is used verbatim.
"""

from __future__ import annotations

import base64
import html as html_mod
import io
import json
import math
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["REPORT_SCHEMA_VERSION", "build_report", "write_report", "render_markdown",
           "render_html", "markdown_to_html"]

REPORT_SCHEMA_VERSION = 1
N_SAMPLES = 6          # held-out prompts shown side by side per generation task
ASSETS = "report_assets"

_SUMMARY_KEYS = [  # shown first and in this order; any other key follows
    ("model", "model"), ("base_model", "base model"), ("data", "data"),
    ("examples", "examples"), ("steps", "optimizer steps"), ("epochs", "epochs"),
    ("tokens", "tokens"), ("wall_time_s", "wall time"), ("tokens_per_s", "tokens/s"),
    ("peak_memory_bytes", "peak memory"), ("loss_kernel", "loss kernel"),
    ("fallbacks", "fallbacks"), ("device", "device"),
    ("versions", "versions"),
]


# ------------------------------------------------------------------------------------- reading


def _read_json(path: Path, warnings: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.append(f"{path.name}: unreadable JSON ({e}); ignored")
        return None


def _read_metrics(path: Path, warnings: list[str]) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    if not path.is_file():
        warnings.append("metrics.jsonl not found: no training curves")
        return train, val
    bad: list[int] = []
    nonfinite: list[Any] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                bad.append(lineno)
                continue
            # files written before the null + flag rule hold bare NaN/Infinity: same meaning
            rec = _finite(rec)
            if any(rec.get(f"{k}_nonfinite") for k in ("loss", "val_loss")):
                nonfinite.append(rec["step"])
            kind = rec.get("kind", "train")
            if kind == "val" or "val_loss" in rec:
                val.append(rec)
            elif kind == "train":
                train.append(rec)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        warnings.append(f"metrics.jsonl: {len(bad)} unreadable line(s) skipped (lines {shown})")
    if nonfinite:
        shown = ", ".join(map(str, nonfinite[:10])) + (" ..." if len(nonfinite) > 10 else "")
        warnings.append(f"metrics.jsonl: non-finite loss at {len(nonfinite)} step(s) ({shown}); "
                        "not plotted")
    return train, val


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (flagged ``<key>_nonfinite``, as
    metrics_jsonl writes them): report.json is strict JSON."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k] = _finite(v)
            if isinstance(v, float) and not math.isfinite(v):
                out.setdefault(f"{k}_nonfinite", "nan" if math.isnan(v) else
                               ("inf" if v > 0 else "-inf"))
        return out
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            x = float(x)
        except (TypeError, ValueError):
            return None
    x = float(x)
    return x if math.isfinite(x) else None


def _metric_rows(results: dict, task: str) -> dict[tuple[str, str], dict]:
    """``{(metric, filter): {"value", "stderr"}}`` from one lm-eval results dict."""
    out = {}
    res = (results.get("results") or {}).get(task) or {}
    for key, v in res.items():
        if "," not in key:
            continue
        metric, flt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        out[(metric, flt)] = {"value": _num(v), "stderr": _num(res.get(f"{metric}_stderr,{flt}"))}
    return out


def _read_samples(path: Path, warnings: list[str]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    if not path.is_file():
        warnings.append(f"samples file not found: {path}")
        return out
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                s = json.loads(line)
                out[int(s["doc_id"])] = s
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                warnings.append(f"{path.name}:{lineno}: unreadable sample line skipped")
    return out


def _sample_prompt(s: dict) -> str:
    doc = s.get("doc") if isinstance(s.get("doc"), dict) else {}
    if isinstance(doc.get("instruction"), str):
        text = doc["instruction"]
        if doc.get("input"):
            text += "\n\n" + str(doc["input"])
        return text
    args = s.get("arguments")
    prompt = ""
    if isinstance(args, dict):  # as EvaluationTracker saves them
        prompt = str((args.get("gen_args_0") or {}).get("arg_0", ""))
    elif isinstance(args, list) and args:
        prompt = str(args[0][0])
    return prompt if len(prompt) <= 400 else "..." + prompt[-400:]


def _sample_response(s: dict) -> str:
    r = s.get("filtered_resps")
    while isinstance(r, list) and r:
        r = r[0]
    return "" if r is None or isinstance(r, list) else str(r)


# -------------------------------------------------------------------------------------- plots


def _plots(train: list[dict], val: list[dict], table: list[dict],
           primary: dict[str, str | None]) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight",
                    metadata={"Software": None})  # no version string: reproducible bytes
        plt.close(fig)
        return buf.getvalue()

    out: dict[str, bytes] = {}
    t_steps = [r["step"] for r in train if _num(r.get("loss")) is not None]
    t_loss = [_num(r["loss"]) for r in train if _num(r.get("loss")) is not None]
    v_steps = [r["step"] for r in val if _num(r.get("val_loss")) is not None]
    v_loss = [_num(r["val_loss"]) for r in val if _num(r.get("val_loss")) is not None]
    if t_steps or v_steps:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        if t_steps:
            ax.plot(t_steps, t_loss, color="#4c72b0", lw=1.2, alpha=0.85, label="train loss")
        if v_steps:
            ax.plot(v_steps, v_loss, color="#dd8452", lw=2, marker="o", ms=4,
                    label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("Training and validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
        if t_loss and min(t_loss + v_loss) > 0 and max(t_loss + v_loss) / min(t_loss + v_loss) > 20:
            ax.set_yscale("log")
        out["loss.png"] = png(fig)
    lr = [(r["step"], _num(r.get("lr"))) for r in train if _num(r.get("lr")) is not None]
    if lr:
        fig, ax = plt.subplots(figsize=(7, 2.6))
        ax.plot([s for s, _ in lr], [v for _, v in lr], color="#55a868", lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title("Learning rate schedule")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        out["lr.png"] = png(fig)
    who_list = [w for w in ("base", "sft") if any(w in r for r in table)]
    bars = [r for r in table if r["metric"] == primary.get(r["task"])
            and any(r.get(w) is not None for w in who_list)]
    if bars:
        import numpy as np
        fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(bars) + 2), 3.4))
        x = np.arange(len(bars))
        w = 0.76 / len(who_list)
        colors = {"base": "#a0a0a0", "sft": "#4c72b0"}
        for k, who in enumerate(who_list):
            off, color = (k - (len(who_list) - 1) / 2) * w, colors[who]
            vals = [r[who] if r[who] is not None else 0.0 for r in bars]
            errs = [r[f"{who}_stderr"] or 0.0 for r in bars]
            rects = ax.bar(x + off, vals, w, yerr=errs, capsize=3, color=color,
                           label="base" if who == "base" else "SFT")
            for rect, r, e in zip(rects, bars, errs):
                v = r[who]
                ax.annotate("n/a" if v is None else f"{v:.2f}",
                            (rect.get_x() + rect.get_width() / 2, rect.get_height() + e),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                            textcoords="offset points")
        ax.set_xticks(x, [f"{r['task']}\n{r['metric']}" for r in bars], fontsize=8)
        top = max([1.0] + [(r[k] or 0) + (r[k + "_stderr"] or 0) for r in bars for k in who_list])
        ax.set_ylim(0, top * 1.15)
        ax.set_title(("Base vs SFT" if len(who_list) == 2 else "SFT checkpoint")
                     + " (primary metric, ± lm-eval stderr)")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        out["benchmarks.png"] = png(fig)
    return out


# ----------------------------------------------------------------------------------- building


def _training_stats(train: list[dict], val: list[dict]) -> dict:
    losses = [_num(r.get("loss")) for r in train if _num(r.get("loss")) is not None]
    vls = [(r["step"], _num(r.get("val_loss")), _num(r.get("val_ppl"))) for r in val
           if _num(r.get("val_loss")) is not None]
    stats: dict[str, Any] = {"train_points": len(train), "val_points": len(val)}
    if losses:
        stats.update(first_train_loss=losses[0], final_train_loss=losses[-1],
                     min_train_loss=min(losses))
    if train:
        stats["last_step"] = train[-1].get("step")
    if vls:
        best = min(vls, key=lambda t: t[1])
        stats.update(first_val_loss=vls[0][1], final_val_loss=vls[-1][1],
                     final_val_ppl=vls[-1][2], best_val_loss=best[1], best_val_step=best[0])
    return stats


def _benchmarks(run_dir: Path, warnings: list[str]) -> tuple[dict | None, dict[str, Any]]:
    """(benchmarks section, raw lm-eval results by model label and task)."""
    eval_dir = run_dir / "eval"
    manifest = _read_json(eval_dir / "manifest.json", warnings)
    if manifest is None:
        return None, {}
    warnings.extend(manifest.get("warnings") or [])  # e.g. demo data on a user's checkpoint
    labels = list(manifest.get("models", {}))
    tasks = manifest.get("tasks") or []
    raw: dict[str, dict[str, dict]] = {lb: {} for lb in labels}
    errors, task_info, table = [], [], []
    versions: dict[str, Any] = {}
    for t in tasks:
        name = t["name"]
        info = {**t, "status": {}, "version": None, "n_samples": {}, "output_type": None,
                "results_files": {}, "samples_files": {}, "eval_time_s": {}}
        metrics: dict[str, dict] = {}
        for lb in labels:
            st = (manifest.get("runs", {}).get(lb) or {}).get(name) or {"status": "error",
                                                                       "error": "not run"}
            info["status"][lb] = st.get("status")
            info["eval_time_s"][lb] = st.get("wall_time_s")
            if st.get("status") != "ok":
                errors.append({"model": lb, "task": name, "error": st.get("error"),
                               "traceback": st.get("traceback"), "log": st.get("log")})
                continue
            rf = eval_dir / st["results_file"]
            res = _read_json(rf, warnings)
            if res is None:
                warnings.append(f"{lb}/{name}: results file {rf} missing or unreadable")
                info["status"][lb] = "error"
                errors.append({"model": lb, "task": name, "error": f"results file {rf} missing",
                               "traceback": None, "log": st.get("log")})
                continue
            raw[lb][name] = res
            info["results_files"][lb] = str(Path("eval") / st["results_file"])
            if st.get("samples_file"):
                info["samples_files"][lb] = str(Path("eval") / st["samples_file"])
            info["version"] = (res.get("versions") or {}).get(name, info["version"])
            info["n_samples"][lb] = ((res.get("n-samples") or {}).get(name) or {}).get("effective")
            info["output_type"] = ((res.get("configs") or {}).get(name) or {}).get("output_type")
            info["n_shot"] = (res.get("n-shot") or {}).get(name)
            for key in ("lm_eval_version", "transformers_version"):
                if res.get(key):
                    versions[key] = res[key]
            hib = (res.get("higher_is_better") or {}).get(name) or {}
            for (metric, flt), v in _metric_rows(res, name).items():
                row = metrics.setdefault(f"{metric},{flt}", {
                    "task": name, "metric": metric, "filter": flt,
                    "higher_is_better": hib.get(metric),
                    **{f"{x}{suffix}": None for x in labels for suffix in ("", "_stderr")}})
                row[lb] = v["value"]
                row[f"{lb}_stderr"] = v["stderr"]
        primary = t.get("primary_metric")
        rows = sorted(metrics.values(), key=lambda r: (r["metric"] != primary, r["metric"]))
        if not rows:  # every model failed: one row that says so
            rows = [{"task": name, "metric": primary or "-", "filter": "none",
                     "higher_is_better": None,
                     **{f"{x}{suffix}": None for x in labels for suffix in ("", "_stderr")}}]
        for row in rows:
            row["status"] = dict(info["status"])
            if "base" in labels and "sft" in labels and row["base"] is not None \
                    and row["sft"] is not None:
                row["delta"] = row["sft"] - row["base"]
            else:
                row["delta"] = None
            table.append(row)
        task_info.append(info)
    section = {
        "models": manifest.get("models", {}),
        "labels": labels,
        "tasks": task_info,
        "table": table,
        "errors": errors,
        "lm_eval_version": manifest.get("lm_eval_version") or versions.get("lm_eval_version"),
        "transformers_version": versions.get("transformers_version"),
        "options": manifest.get("options"),
        "created": manifest.get("created"),
    }
    return section, raw


def _side_by_side(run_dir: Path, bench: dict, warnings: list[str]) -> list[dict]:
    out = []
    labels = bench["labels"]
    for info in bench["tasks"]:
        if info.get("output_type") != "generate_until":
            continue
        per_label = {lb: _read_samples(run_dir / p, warnings)
                     for lb, p in info["samples_files"].items()}
        if not per_label:
            continue
        doc_ids = sorted(set.intersection(*(set(d) for d in per_label.values())))
        for doc_id in doc_ids[:N_SAMPLES]:
            first = next(iter(per_label.values()))[doc_id]
            row = {"task": info["name"], "doc_id": doc_id, "prompt": _sample_prompt(first),
                   "target": str(first.get("target", "")), "responses": {}, "scores": {}}
            for lb in labels:
                s = per_label.get(lb, {}).get(doc_id)
                row["responses"][lb] = None if s is None else _sample_response(s)
                metric = info.get("primary_metric")
                row["scores"][lb] = None if s is None else _num(s.get(metric)) if metric else None
            out.append(row)
    return out


def _plugin_sections(pm: Any, run_dir: Path, report: dict, warnings: list[str]) -> list[dict]:
    if pm is None:
        return []
    hook = getattr(pm.hook, "sftctl_report_sections", None)
    if hook is None:
        return []
    out = []
    for impl in hook.get_hookimpls():
        if getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False):
            continue
        kwargs = {"run_dir": run_dir, "report": report}
        try:
            res = impl.function(**{a: kwargs[a] for a in impl.argnames})
        except Exception as e:
            warnings.append(f"plugin {impl.plugin_name!r}: sftctl_report_sections failed: "
                            f"{type(e).__name__}: {e}")
            continue
        if res is None:
            continue
        if not isinstance(res, (list, tuple)):
            res = [res]
        for sec in res:
            if hasattr(sec, "title") and not isinstance(sec, dict):
                sec = {"title": sec.title, "markdown": getattr(sec, "markdown", ""),
                       "html": getattr(sec, "html", None)}
            if not isinstance(sec, dict) or not isinstance(sec.get("title"), str):
                warnings.append(f"plugin {impl.plugin_name!r}: report section without a title "
                                f"ignored ({type(sec).__name__})")
                continue
            out.append({"title": sec["title"], "markdown": str(sec.get("markdown") or ""),
                        "html": sec.get("html"), "plugin": impl.plugin_name})
    return out


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("sftctl", "torch", "transformers", "lm_eval", "datasets", "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _steering(summary: Any, warnings: list[str]) -> dict | None:
    """summary.json's ``steering`` (``--benchmark-every`` series, ``--select-best``, gates;
    ``steering.py``) with the curves the report plots; None when the run asked for none."""
    st = summary.get("steering") if isinstance(summary, dict) else None
    if st is None:
        return None
    if not isinstance(st, dict):
        warnings.append("summary.json: 'steering' is not an object; ignored")
        return None
    out = {k: st.get(k) for k in ("benchmark_every", "benchmark_limit", "select_best",
                                  "require", "selected", "gates_passed")}
    out["points"] = [p for p in st.get("points") or [] if isinstance(p, dict)]
    out["gates"] = [g for g in st.get("gates") or [] if isinstance(g, dict)]
    for p in out["points"]:
        for task, err in (p.get("errors") or {}).items():
            warnings.append(f"benchmark {task} at step {p.get('step')} failed: {err}")
    return out


def steps_curves(steering: dict, primary: dict[str, str | None]) -> list[tuple[str, str]]:
    """The (task, metric key) pairs the series shows: the --select-best metric, the gates'
    metrics, then each task's primary metric (else its first), at most 6."""
    points = steering["points"]
    tasks = list(dict.fromkeys(t for p in points for t in p.get("scores", {})))
    wanted: list[tuple[str, str]] = []
    for text in [steering.get("select_best")] + [g.get("task", "") + ":" + str(g.get("metric"))
                                                 for g in steering.get("gates") or []]:
        if text and ":" in text:
            task, metric = text.split(":", 1)
            wanted.append((task, metric))
    for task in tasks:
        keys = list(dict.fromkeys(k for p in points for k in (p["scores"].get(task) or {})))
        if keys:
            pm_ = primary.get(task)
            wanted.append((task, pm_ if pm_ in keys else keys[0]))
    out: list[tuple[str, str]] = []
    for task, metric in wanted:
        keys = list(dict.fromkeys(k for p in points for k in (p["scores"].get(task) or {})))
        match = metric if metric in keys else next((k for k in keys
                                                    if k.split(",", 1)[0] == metric), None)
        if match and (task, match) not in out:
            out.append((task, match))
    return out[:6]


def _steps_plot(train: list[dict], steering: dict, primary: dict[str, str | None]) -> bytes:
    """Training loss and, next to it, each shown benchmark score against the step."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    curves = steps_curves(steering, primary)
    n = 1 + max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0), squeeze=False)
    axes = axes[0]
    t = [(r["step"], _num(r.get("loss"))) for r in train if _num(r.get("loss")) is not None]
    axes[0].plot([s for s, _ in t], [v for _, v in t], color="#4c72b0", lw=1.2)
    axes[0].set_title("train loss", fontsize=9)
    sel = steering.get("selected") or {}
    for ax, (task, key) in zip(axes[1:], curves):
        pts = [(p["step"], _num((p["scores"].get(task) or {}).get(key)), p.get("model"))
               for p in steering["points"]]
        pts = [x for x in pts if x[1] is not None]
        ax.plot([s for s, _, _ in pts], [v for _, v, _ in pts], color="#dd8452", lw=1.5,
                marker="o", ms=4)
        if sel.get("task") == task and sel.get("metric") == key and sel.get("step") is not None:
            ax.plot([sel["step"]], [sel["score"]], marker="*", ms=14, color="#137333",
                    ls="none", label=f"selected: step {sel['step']}")
            ax.legend(fontsize=7)
        ax.set_title(f"{task}\n{key}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def steering_markdown(report: dict) -> tuple[str, str]:
    """(gates block, series block) in Markdown; empty strings when the run has none."""
    st = report.get("steering")
    if not st:
        return "", ""
    gates = ""
    if st.get("gates"):
        ok = st.get("gates_passed")
        L = [f"Gates on the final benchmark (`--require`): **{'all passed' if ok else 'FAILED'}**"
             + ("" if ok else " — `sftctl train` exits with 5"), "",
             "| gate | compared | value | result |", "|---|---|---|---|"]
        for g in st["gates"]:
            value = "–" if g.get("value") is None else f"{g['value']:.4f}"
            result = "passed" if g.get("passed") else "**FAILED**" + (
                f": {g['error']}" if g.get("error") else "")
            what = "SFT − base" if g.get("kind") == "delta" else "SFT"
            L.append("| " + " | ".join(_md_cell(c) for c in (f"`{g.get('gate')}`", what, value,
                                                               result)) + " |")
        gates = "\n".join(L)
    series = ""
    if st.get("points"):
        primary = {t["name"]: t.get("primary_metric")
                   for t in (report.get("benchmarks") or {}).get("tasks", [])}
        curves = steps_curves(st, primary)
        L = [f"Benchmarked every {st.get('benchmark_every')} steps on the first "
             f"{st.get('benchmark_limit')} documents of each benchmark (the final model's "
             "point too; the table above uses every document).", ""]
        head = ["step", "model", *[f"{t}:{k}" for t, k in curves]]
        L += ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
        for p in st["points"]:
            cells = [str(p.get("step")), str(p.get("model"))]
            for t, k in curves:
                if t in (p.get("errors") or {}):
                    cells.append("error")
                else:
                    v = (p["scores"].get(t) or {}).get(k)
                    cells.append("–" if v is None else f"{v:.4f}")
            L.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        sel = st.get("selected")
        if sel and sel.get("step") is not None:
            where = ("the final model; model/ is unchanged" if sel.get("model") == "final" else
                     f"model/ holds it; the final model is in {sel.get('final_dir')}/")
            L += ["", f"Selected (`--select-best {st.get('select_best')}`): **step "
                      f"{sel['step']}**, {sel.get('metric')} = {sel['score']:.4f} ({where})."]
        elif sel:
            L += ["", f"`--select-best {st.get('select_best')}`: nothing selected "
                      f"({sel.get('reason')}); model/ is the final model."]
        series = "\n".join(L)
    return gates, series


def build_report(run_dir: str | Path, pm: Any = None) -> tuple[dict, dict[str, bytes]]:
    """The report dict (what report.json holds) and its PNG assets, from the run dir alone."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    warnings: list[str] = []
    summary = _read_json(run_dir / "summary.json", warnings)
    if summary is None and not (run_dir / "summary.json").is_file():
        warnings.append("summary.json not found: no run summary (evaluation-only directory?)")
    config = None
    if (run_dir / "config.yaml").is_file():
        import yaml
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            warnings.append(f"config.yaml: unreadable YAML ({e}); ignored")
    train, val = _read_metrics(run_dir / "metrics.jsonl", warnings)
    bench, _raw = _benchmarks(run_dir, warnings)
    if bench is None:
        warnings.append("no benchmark results (eval/manifest.json not found: evaluation skipped "
                        "or not run yet)")
    samples = _side_by_side(run_dir, bench, warnings) if bench else []
    primary = {t["name"]: t.get("primary_metric") for t in (bench or {}).get("tasks", [])}
    assets = _plots(train, val, (bench or {}).get("table", []), primary)
    steering = _steering(summary, warnings)
    if steering and steering["points"]:
        assets["benchmark_steps.png"] = _steps_plot(train, steering, primary)
    report: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generator": {"name": "sftctl.evals.report", "versions": _versions()},
        "run_dir": str(run_dir),
        "run": summary,
        "config": config,
        "training": {**_training_stats(train, val),
                     "train": [{**{k: r.get(k) for k in ("step", "loss", "lr", "tokens_per_s")},
                                **({"loss_nonfinite": r["loss_nonfinite"]}
                                   if "loss_nonfinite" in r else {})} for r in train],
                     "val": [{k: r.get(k) for k in ("step", "val_loss", "val_ppl")} for r in val]},
        "plots": {name.rsplit(".", 1)[0]: f"{ASSETS}/{name}" for name in sorted(assets)},
        "benchmarks": bench,
        "steering": steering,
        "samples": samples,
        "sections": [],
        "warnings": warnings,
    }
    report["sections"] = _plugin_sections(pm, run_dir, report, warnings)
    return report, assets


# ---------------------------------------------------------------------------------- rendering


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_bytes(n: Any) -> str:
    n = _num(n)
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _fmt_value(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if key == "peak_memory_bytes":
        return _fmt_bytes(v)
    if key == "wall_time_s" and _num(v) is not None:
        s = _num(v)
        return f"{s:.1f} s" + (f" ({s / 60:.1f} min)" if s >= 60 else "")
    if key == "tokens_per_s" and _num(v) is not None:
        return f"{_num(v):,.0f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt_value(k, x)}" for k, x in v.items()
                         if x not in ([], {}, None)) or "–"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(key, x) for x in v) or "–"
    if isinstance(v, float):
        return f"{v:.6g}"
    return _fmt(v)


def summary_items(report: dict) -> list[tuple[str, list[str]]]:
    """(label, lines) for the run summary; a dict of dicts (e.g. per-split counts) gets one line
    per entry."""
    run = report.get("run") or {}
    items, seen = [], set()

    def lines(key: str, v: Any) -> list[str]:
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            return [f"{k}: {_fmt_value(key, x)}" for k, x in v.items()]
        return [_fmt_value(key, v)]

    for key, label in _SUMMARY_KEYS:
        if key in run:
            items.append((label, lines(key, run[key])))
            seen.add(key)
    for key, v in run.items():
        if key not in seen and key != "benchmarks":
            items.append((key.replace("_", " "), lines(key, v)))
    return items


def _delta_str(row: dict) -> str:
    d = row.get("delta")
    if d is None:
        return "–"
    return f"{d:+.4f}"


def _pm(v: Any, se: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else "")


SHOWN_CHARS = 120  # displayed answer length in md/html (report.json keeps the whole answer)


def _clip(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + f"… (+{len(text) - SHOWN_CHARS} chars)"


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", "<br>")


def benchmark_markdown(rows: list[dict], labels: list[str], fmt=None) -> str:
    """A Markdown table of report.json's benchmark rows: task, metric, one column per model
    label (base, sft), delta; ``fmt`` formats a score (default: 4 decimals)."""
    if fmt is None:
        def fmt(v):
            return "–" if v is None else f"{v:.4f}"

    both = "base" in labels and "sft" in labels
    head = ["task", "metric", *labels] + (["delta (SFT − base)"] if both else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        metric = r.get("metric", "-") + ("" if r.get("filter", "none") == "none"
                                         else f" ({r['filter']})")
        cells = [str(r.get("task")), metric]
        for lb in labels:
            ok = (r.get("status") or {}).get(lb, "ok") == "ok"
            cells.append(fmt(r.get(lb)) if ok else "error")
        if both:
            d = r.get("delta")
            cells.append("–" if d is None else f"{d:+.4f}")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    L: list[str] = ["# sftctl run report", ""]
    L.append(f"Run directory: `{report['run_dir']}` — generated {report['generated_at']} "
             f"(report schema {report['schema_version']})")
    L.append("")
    bench = report.get("benchmarks")
    both = bool(bench) and "base" in bench["labels"] and "sft" in bench["labels"]
    L += ["## Benchmarks: base vs SFT" if both or not bench else "## Benchmarks", ""]
    if not bench:
        L.append("No benchmark results.")
    else:
        labels = bench["labels"]
        head = ["task", "metric", *labels]
        if "base" in labels and "sft" in labels:
            head.append("delta (SFT − base)")
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for r in bench["table"]:
            cells = [r["task"], r["metric"] + ("" if r["filter"] == "none" else f" ({r['filter']})")]
            for lb in labels:
                cells.append("error" if r["status"].get(lb) != "ok" else
                             _pm(r.get(lb), r.get(f"{lb}_stderr")))
            if len(head) > len(cells):
                cells.append(_delta_str(r))
            L.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        L.append("")
        L.append("Values are lm-eval's, ± its standard error. Models: " + ", ".join(
            f"{lb} = `{m.get('path')}`" for lb, m in bench["models"].items()))
        L.append("")
        if "benchmarks" in report["plots"]:
            L += [f"![base vs SFT]({report['plots']['benchmarks']})", ""]
        if bench["errors"]:
            L += ["### Failed benchmarks", ""]
            for e in bench["errors"]:
                L.append(f"- **{e['model']} / {e['task']}**: {e['error']}")
            L.append("")
    gates_md, series_md = steering_markdown(report)
    if gates_md:
        L += ["## Gates", "", gates_md, ""]
    if report["samples"]:
        L += ["## Held-out prompts: base vs SFT", ""]
        labels = bench["labels"] if bench else []
        head = ["task", "prompt", "reference", *labels]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for s in report["samples"]:
            cells = [s["task"], s["prompt"], s["target"]]
            for lb in labels:
                resp = s["responses"].get(lb)
                mark = {1.0: " ✓", 0.0: " ✗"}.get(s["scores"].get(lb), "")
                cells.append(("–" if resp is None else f"`{_clip(resp)}`" if resp else "(empty)")
                             + mark)
            L.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        L.append("")
    L += ["## Training", ""]
    tr = report["training"]
    stats = [(k.replace("_", " "), _fmt(v)) for k, v in tr.items() if k not in ("train", "val")]
    L += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in stats] + [""]
    for key, alt in (("loss", "loss curves"), ("lr", "learning rate")):
        if key in report["plots"]:
            L += [f"![{alt}]({report['plots'][key]})", ""]
    if series_md:
        L += ["### Benchmarks during training", "", series_md, ""]
        if "benchmark_steps" in report["plots"]:
            L += [f"![benchmark score per step]({report['plots']['benchmark_steps']})", ""]
    L += ["## Run summary", ""]
    items = summary_items(report)
    if items:
        L += ["| | |", "|---|---|"] + [f"| {_md_cell(k)} | {'<br>'.join(map(_md_cell, v))} |"
                                       for k, v in items]
    else:
        L.append("No run summary (summary.json missing).")
    L.append("")
    if bench:
        L += ["## Versions", ""]
        L.append(f"- lm-eval {bench.get('lm_eval_version')}, transformers "
                 f"{bench.get('transformers_version')}")
        for t in bench["tasks"]:
            L.append(f"- task `{t['name']}` version {t.get('version')}, {t.get('n_shot', 0)}-shot, "
                     f"docs {t.get('n_samples')}" + (f", plugin {t['plugin']}" if t.get("plugin") else "")
                     + (f": {t['description']}" if t.get("description") else ""))
        L.append("")
    for sec in report["sections"]:
        L += [f"## {sec['title']}", "", sec["markdown"], ""]
    if report["warnings"]:
        L += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return "\n".join(L)


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*([^*]+)\*(?!\w)"), r"<em>\1</em>"),
    # links: http(s), in-page anchors and relative paths only (no javascript:, data: ...)
    (re.compile(r"\[([^\]]+)\]\((https?://[^)\s]+|#[^)\s]*|(?![\w+.-]*:)[^)\s]+)\)"),
     r'<a href="\2">\1</a>'),
]


def _inline(text: str) -> str:
    out = html_mod.escape(text, quote=True)
    for rx, rep in _INLINE:
        out = rx.sub(rep, out)
    return out


def markdown_to_html(md: str) -> str:
    """A small, escaping markdown subset: headings, paragraphs, lists, fenced code, pipe tables,
    inline code, bold, italic and links. Everything else is shown as text."""
    lines = md.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre><code>" + html_mod.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        m = re.match(r"^(#{1,4})\s+(.*)$", line)
        if m:
            lvl = min(6, len(m.group(1)) + 2)  # sections are h2: plugin headings start at h3
            out.append(f"<h{lvl}>{_inline(m.group(2))}</h{lvl}>")
            i += 1
            continue
        if re.match(r"^\s*[-*]\s+", line):
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append("<li>" + _inline(re.sub(r"^\s*[-*]\s+", "", lines[i])) + "</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        if line.strip().startswith("|") and i + 1 < len(lines) and \
                re.match(r"^\s*\|?\s*:?-+", lines[i + 1]):
            def cells(row: str) -> list[str]:
                return [c.strip() for c in row.strip().strip("|").split("|")]
            head = cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head)
                       + "</tr></thead><tbody>" + "".join(
                           "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                           for r in rows) + "</tbody></table>")
            continue
        if not line.strip():
            i += 1
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(
                r"^(#{1,4}\s|\s*[-*]\s|```|\s*\|)", lines[i]):
            para.append(lines[i])
            i += 1
        if not para:  # a line that looks like a block start but is not one: plain text
            para, i = [line], i + 1
        out.append("<p>" + _inline(" ".join(para)) + "</p>")
    return "\n".join(out)


def render_html(report: dict, assets: dict[str, bytes]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True)
    images = {name.rsplit(".", 1)[0]: "data:image/png;base64," + base64.b64encode(data).decode()
              for name, data in assets.items()}
    sections = [{**s, "body": jinja2.utils.markupsafe.Markup(
        s["html"] if s.get("html") else markdown_to_html(s["markdown"]))}
        for s in report["sections"]]
    tr = report["training"]
    gates_md, series_md = steering_markdown(report)
    Markup = jinja2.utils.markupsafe.Markup
    return env.get_template("report.html.j2").render(
        r=report, images=images, summary=summary_items(report), sections=sections,
        gates_html=Markup(markdown_to_html(gates_md)) if gates_md else None,
        series_html=Markup(markdown_to_html(series_md)) if series_md else None,
        training_stats=[(k.replace("_", " "), _fmt(v)) for k, v in tr.items()
                        if k not in ("train", "val")],
        fmt=_fmt, pm=_pm, delta=_delta_str, clip=_clip)


def _json_safe(x: Any, path: str, bad: list[str]) -> Any:
    """NaN/inf are not JSON: they become null and their places are listed."""
    if isinstance(x, float) and not math.isfinite(x):
        bad.append(path)
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v, f"{path}.{k}", bad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v, f"{path}[{i}]", bad) for i, v in enumerate(x)]
    return x


def write_report(run_dir: str | Path, pm: Any = None) -> dict[str, Path]:
    """Build the report from ``run_dir`` and write report.json/.md/.html and report_assets/."""
    run_dir = Path(run_dir).resolve()
    report, assets = build_report(run_dir, pm=pm)
    bad: list[str] = []
    report = _json_safe(report, "report", bad)
    if bad:
        report["warnings"].append(f"{len(bad)} non-finite number(s) written as null: "
                                  + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    asset_dir = run_dir / ASSETS
    asset_dir.mkdir(exist_ok=True)
    for name, data in assets.items():
        (asset_dir / name).write_bytes(data)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md",
             "html": run_dir / "report.html"}
    paths["json"].write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(report) + "\n", encoding="utf-8")
    paths["html"].write_text(render_html(report, assets), encoding="utf-8")
    return paths
