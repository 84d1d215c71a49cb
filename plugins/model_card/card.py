"""Rendering of ``model/README.md``: a Hugging Face model card for the final checkpoint.

Design choices
- One pure function, ``render_card(inputs)``, from what the run wrote: the summary
  (``model/sftctl_summary.json``), the resolved config (``model/sftctl_config.yaml``), the
  metrics history and the benchmark state. The same renderer serves the first card (written with
  the model, inside its atomic directory) and the card updated after the post-training
  evaluation (``update_card``), and ``sftctl model-card RUN_DIR`` after a later ``sftctl eval``.
- The YAML front matter comes from ``huggingface_hub.ModelCardData`` (Hugging Face's own
  serializer; the tests parse it back with ``huggingface_hub.ModelCard``): ``library_name:
  transformers``, ``pipeline_tag: text-generation``, ``tags`` (sftctl, sft, lora when an adapter
  was merged), ``base_model`` and ``datasets`` only when they are Hub ids (a local path or the
  embedded demo model is named in the text, never in metadata that the Hub would link).
- Never a claim without results: the benchmark section states exactly one of "not run
  (--no-eval)", "runs after this checkpoint is saved" (the card written with the model, replaced
  by the post-training step), "produced no results (reason)", or the table of ``report.json``
  written for this model (a report older than the model is another run's and is not used).
- The loss curve is an image next to the card (``loss_curve.png``, matplotlib, written with the
  model) and a table of at most ``CURVE_ROWS`` points, so it reads even where images do not.
- Every write is atomic (a temporary file renamed over ``README.md``): a reader sees the old or
  the new card, never half of one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CURVE_ROWS = 12
EMBEDDED = "embedded:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class CardInputs:
    summary: dict
    config: dict
    history: list[dict] = field(default_factory=list)
    # "pending" | "disabled" | ("failed", reason) | ("table", benchmarks section of report.json)
    benchmarks: Any = "pending"
    repo_id: str | None = None


def hub_id(ref: str | None) -> str | None:
    """``ref`` when it looks like a Hub id and is not a local path, else None."""
    if not ref or ref.startswith(EMBEDDED) or Path(ref).exists():
        return None
    return ref if HUB_ID.match(ref) and not ref.startswith((".", "/")) else None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(v: Any) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def front_matter(inp: CardInputs) -> str:
    from huggingface_hub import ModelCardData

    s, cfg = inp.summary, inp.config
    base = hub_id(s.get("model"))
    sources = (s.get("data") or {}).get("train") or []
    datasets = [d for d in (hub_id(str(x)) for x in sources) if d]
    tags = ["sftctl", "sft", "text-generation"]
    if "lora" in (cfg.get("plugins") or []):
        tags.append("lora")
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         base_model=base, datasets=datasets or None,
                         tags=tags)
    return "---\n" + data.to_yaml() + "\n---\n"


def _base_text(s: dict) -> str:
    ref = s.get("model") or "?"
    if ref.startswith(EMBEDDED):
        return (f"sftctl's embedded demo model (`{ref}`, built from its own config and "
                "tokenizer, randomly initialized)")
    if hub_id(ref):
        return f"[`{ref}`](https://huggingface.co/{ref})"
    return f"the local model `{ref}`"


def _data_section(s: dict, cfg: dict) -> list[str]:
    d = s.get("data") or {}
    detail = s.get("examples_detail") or {}
    L = ["## Training data", ""]
    L.append(f"- format: `{d.get('format')}` (plugin `{d.get('format_plugin')}`)")
    for split in ("train", "validation"):
        srcs = d.get(split) or []
        st = detail.get(split) or {}
        if not srcs and not st:
            continue
        names = ", ".join(f"`{x}`" for x in srcs) or "the format's demo data"
        counts = ""
        if st:
            counts = (f": {st.get('used')} examples used of {st.get('records')} records "
                      f"({st.get('truncated')} truncated, {st.get('dropped')} dropped, "
                      f"{st.get('skipped')} skipped), {st.get('tokens')} tokens, "
                      f"{st.get('trainable_tokens')} trained")
        L.append(f"- {split}: {names}{counts}")
    L.append(f"- sequence length: {d.get('max_seq_len')} tokens, packing "
             f"{'on' if d.get('packing') else 'off'}, loss on "
             f"{'prompt and response' if (cfg.get('data') or {}).get('train_on_prompt') else 'responses only'}")
    return L + [""]


def _hyper_section(s: dict, cfg: dict) -> list[str]:
    o, t, m = cfg.get("optim") or {}, cfg.get("train") or {}, cfg.get("model") or {}
    world = s.get("world_size") or 1
    rows = [
        ("optimizer", o.get("name")), ("learning rate", o.get("lr")),
        ("scheduler", o.get("scheduler")),
        ("warmup", f"{o.get('warmup_steps')} steps" if o.get("warmup_steps")
         else f"ratio {o.get('warmup_ratio')}"),
        ("weight decay", o.get("weight_decay")), ("gradient clipping", o.get("grad_clip")),
        ("batch size per device", t.get("batch_size")),
        ("gradient accumulation", t.get("grad_accum")),
        ("devices", world),
        ("effective batch", (t.get("batch_size") or 0) * (t.get("grad_accum") or 0) * world),
        ("epochs", s.get("epochs")), ("optimizer steps", s.get("steps")),
        ("precision", s.get("precision")), ("seed", t.get("seed")),
        ("gradient checkpointing", m.get("gradient_checkpointing")),
        ("label smoothing", t.get("label_smoothing")), ("z-loss", t.get("z_loss")),
    ]
    opts = cfg.get("options") or {}
    if "lora" in (cfg.get("plugins") or []):
        rows += [(f"`{k}`", v) for k, v in sorted(opts.items())
                 if k.startswith("lora.") and v is not None]
    L = ["## Training hyperparameters", "", "| hyperparameter | value |", "|---|---|"]
    L += [f"| {k} | {_cell(v)} |" for k, v in rows]
    L.append("")
    L.append("The full resolved configuration is `sftctl_config.yaml` in this folder.")
    return L + [""]


def _bench_section(inp: CardInputs) -> list[str]:
    b = inp.benchmarks
    L = ["## Evaluation: base vs SFT", ""]
    if b == "disabled":
        L.append("No benchmarks were run: the training run had `--no-eval`. "
                 "`sftctl eval RUN_DIR` benchmarks the base model and this one; "
                 "`sftctl model-card RUN_DIR` then adds the results here.")
    elif b == "pending":
        L.append("No benchmark results yet: the post-training evaluation (base vs SFT) runs "
                 "after this checkpoint is saved and then replaces this section with its "
                 "results, or with the reason there are none.")
    elif isinstance(b, tuple) and b[0] == "failed":
        L.append(f"The post-training evaluation produced no results: {b[1]}. No benchmark "
                 "numbers are claimed for this model.")
    else:
        bench = b[1]
        from sftctl.evals.report import benchmark_markdown

        L.append(benchmark_markdown(bench.get("table") or [], bench.get("labels") or [],
                                    fmt=_fmt))
        L.append("")
        sizes = []
        for t in bench.get("tasks") or []:
            n = (t.get("n_samples") or {}).get("sft") or (t.get("n_samples") or {}).get("base")
            if n is not None:
                sizes.append(f"`{t.get('name')}`: {n} examples")
        ver = bench.get("lm_eval_version")
        L.append("Computed with lm-evaluation-harness" + (f" {ver}" if ver else "") +
                 " on the base model and on this checkpoint after training" +
                 (f" ({'; '.join(sizes)})" if sizes else "") +
                 ". Details and sample answers: the run's `report.md` / `report.json`.")
    return L + [""]


def curve_points(history: list[dict]) -> list[tuple[int, float | None, float | None]]:
    """(step, train loss, val loss) at up to CURVE_ROWS evenly spaced steps, the last included."""
    train = {h["step"]: h.get("loss") for h in history if h.get("kind") == "train"}
    val = {h["step"]: h.get("val_loss") for h in history if h.get("kind") == "val"}
    steps = sorted(set(train) | set(val))
    if len(steps) > CURVE_ROWS:
        idx = sorted({round(i * (len(steps) - 1) / (CURVE_ROWS - 1)) for i in range(CURVE_ROWS)})
        steps = [steps[i] for i in idx]
    return [(s, train.get(s), val.get(s)) for s in steps]


def _curve_section(inp: CardInputs, has_image: bool) -> list[str]:
    L = ["## Training loss", ""]
    pts = curve_points(inp.history)
    if not pts:
        return L + ["No loss was recorded.", ""]
    if has_image:
        L += ["![Training and validation loss](loss_curve.png)", ""]
    L += ["| step | train loss | validation loss |", "|---|---|---|"]
    L += [f"| {s} | {_fmt(a)} | {_fmt(b)} |" for s, a, b in pts]
    s = inp.summary
    L += ["", f"Final training loss {_fmt(s.get('final_loss'))}, validation loss "
          f"{_fmt(s.get('initial_val_loss'))} before training and {_fmt(s.get('val_loss'))} "
          "after (token-mean cross-entropy of the trained tokens).", ""]
    return L


def render_card(inp: CardInputs, has_image: bool = False) -> str:
    s, cfg = inp.summary, inp.config
    title = inp.repo_id.split("/")[-1] if inp.repo_id else "SFT model"
    lora = "lora" in (cfg.get("plugins") or [])
    L = [front_matter(inp), f"# {title}", ""]
    L.append(f"A supervised fine-tune (SFT) of {_base_text(s)} made with sftctl" +
             (" (LoRA adapters, merged into the base weights)" if lora else "") +
             f": {s.get('steps')} optimizer steps on {s.get('tokens')} tokens "
             f"({s.get('trainable_tokens')} trained).")
    L.append("")
    L += _data_section(s, cfg)
    L += _hyper_section(s, cfg)
    L += _bench_section(inp)
    L += _curve_section(inp, has_image)
    v = s.get("versions") or {}
    L += ["## Usage", "", "```python",
          "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
          f'path = "{inp.repo_id or "path/to/model"}"',
          "tokenizer = AutoTokenizer.from_pretrained(path)",
          "model = AutoModelForCausalLM.from_pretrained(path)", "```", ""]
    L += ["## Training run", "",
          f"- device: {s.get('device')}, {s.get('world_size')} process(es) "
          f"({s.get('strategy')}), precision {s.get('precision')}",
          f"- training time: {_fmt(s.get('train_time_s'))} s, "
          f"{_fmt(s.get('tokens_per_s'))} tokens/s",
          "- versions: " + (", ".join(f"{k} {val}" for k, val in v.items() if val) or "–"), ""]
    return "\n".join(L)


def write_loss_curve(history: list[dict], path: Path) -> bool:
    """``loss_curve.png``: training loss (and validation loss) against the step."""
    train = [(h["step"], h.get("loss")) for h in history if h.get("kind") == "train"
             and isinstance(h.get("loss"), (int, float))]
    val = [(h["step"], h.get("val_loss")) for h in history if h.get("kind") == "val"
           and isinstance(h.get("val_loss"), (int, float))]
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4c72b0", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#dd8452", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from io import BytesIO

    buf = BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)  # atomic: the old image or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


# -------------------------------------------------------------------------- from a run dir


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def benchmark_state(run_dir: Path, eval_enabled: bool) -> Any:
    """What the card may say about benchmarks, from this run's ``report.json``."""
    run_dir = Path(run_dir)
    report = run_dir / "report.json"
    model_summary = run_dir / "model" / "sftctl_summary.json"
    if not report.is_file():
        return "disabled" if not eval_enabled else \
            ("failed", "no report.json was written (see the evaluation's messages)")
    if model_summary.is_file() and report.stat().st_mtime < model_summary.stat().st_mtime:
        return ("failed", f"{report.name} is older than this model (another run's); run "
                          "`sftctl eval` on this run directory")
    try:
        bench = json.loads(report.read_text(encoding="utf-8")).get("benchmarks")
    except (OSError, ValueError) as e:
        return ("failed", f"{report.name} is unreadable ({e})")
    if not bench or not bench.get("table"):
        return ("failed", "no benchmark was registered or none ran (see report.md)")
    oks = [lb for t in bench.get("tasks") or [] for lb, st in (t.get("status") or {}).items()
           if st == "ok"]
    if not oks:
        return ("failed", "every benchmark failed (see report.md)")
    return ("table", bench)


def card_inputs(run_dir: Path, *, eval_enabled: bool | None = None,
                benchmarks: Any = None) -> CardInputs:
    """The inputs of the card of ``run_dir/model`` from the files the run wrote."""
    import yaml

    model_dir = Path(run_dir) / "model"
    summary = json.loads((model_dir / "sftctl_summary.json").read_text(encoding="utf-8"))
    config = yaml.safe_load((model_dir / "sftctl_config.yaml").read_text(encoding="utf-8"))
    if eval_enabled is None:
        eval_enabled = bool((config.get("eval") or {}).get("enabled", True))
    if benchmarks is None:
        benchmarks = benchmark_state(run_dir, eval_enabled)
    return CardInputs(summary, config, read_history(run_dir), benchmarks,
                      (config.get("train") or {}).get("push_to_hub"))


def update_card(run_dir: Path, **kw) -> Path:
    """Re-render ``run_dir/model/README.md`` (atomically) from the run's files."""
    from sftctl.training.atomic import write_text

    model_dir = Path(run_dir) / "model"
    inp = card_inputs(run_dir, **kw)
    path = model_dir / "README.md"
    write_text(path, render_card(inp, has_image=(model_dir / "loss_curve.png").is_file()))
    return path
