"""The benchmark of the user's own data: base vs SFT on held-out records of the run's format.

``user_benchmarks(records, fmt, ...)`` turns held-out records into two lm-eval tasks (data,
YAMLs and a one-line class module written into one folder) and returns their ``BenchmarkSpec`` s:

- ``heldout_generate`` (``generate_until``): greedy decoding from the record's prompt, in the
  data's own prompt format; scored against the reference by ``exact_match`` (surrounding
  whitespace ignored), ``normalized_match`` (case, punctuation and whitespace ignored),
  ``rouge_l`` (rouge-score's ROUGE-L F1, mean over records) and ``chrf`` (sacrebleu's corpus
  chrF, 0-100).
- ``heldout_nll`` (``loglikelihood_rolling``): the log-likelihood of each reference given its
  prompt, ``nll_per_token`` (summed over all references, divided by their tokens) and
  ``perplexity`` (its exponential); lower is better.

Design choices
- Every dataset format works, third-party ones included: the pairs come from
  ``DatasetFormat.pair`` (a segment format needs nothing: the text before its last trainable
  segment is the prompt, that segment the reference; the chat format gives the conversation
  minus its last answer as messages, and the answer). A string prompt is used verbatim (the
  Alpaca template exactly as training formats it); a message-list prompt is rendered by the
  evaluated model's chat template through lm-eval's ``apply_chat_template`` (the spec carries
  the run's template for a base model that has none).
- Stock lm-eval gives the numbers. Both tasks are ``ConfigurableTask`` subclasses (loaded by
  the YAML's ``class: !function``) that only build the context and score; generation, requests,
  batching, logging of samples and aggregation are lm-eval's, so ``python -m lm_eval
  --include_path FOLDER --tasks heldout_generate`` on the same files and checkpoint gives the
  same numbers (tests/test_user_benchmarks.py checks it).
- The conditional log-likelihood is ``ll(prompt + reference) - ll(prompt)`` from two rolling
  requests rather than one ``loglikelihood`` request: rolling requests are tokenized whole,
  so no rule about moving the prompt's trailing whitespace into the continuation (lm-eval's,
  or sftctl's fix of it in the runner) changes the number, and any ``hf`` model, stock or
  sftctl's, gives the same value. The token count of each reference (``ref_tokens``: tokens of
  prompt + reference minus tokens of the prompt, by the checkpoint's tokenizer, prompt rendered
  by its chat template) is computed when the task is written and stored in the data file.
- The cap on new tokens is derived from the references: 1.25 x the longest reference in tokens
  + 8, at most 1024; newline stops generation only when no reference contains one (EOS always
  does). Both are recorded in the spec's stats and description.
- Held-out records come from ``--heldout FILE``, else ``--val-data``/``--val-split``, else a
  seeded slice of ``--data`` held out of training (``sftctl.data.prepare_data``); summary.json's
  ``heldout`` says which, and the report's task description shows the count and the source.
"""

from __future__ import annotations

import json
import math
import re
import string
import unicodedata
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from sftctl.run.benchmarks import BenchmarkSpec

__all__ = ["GENERATE_TASK", "NLL_TASK", "user_benchmarks", "load_heldout_records",
           "normalize_text", "UserGenerateTask", "UserNLLTask"]

GENERATE_TASK = "heldout_generate"
NLL_TASK = "heldout_nll"
DATA_FILE = "heldout_pairs.jsonl"
SHIM = "sftctl_heldout_task.py"
MAX_GEN_TOKS = 1024


# ----------------------------------------------------------------------------- building tasks


def load_heldout_records(heldout: Mapping[str, Any], run_dir: Path | None, fmt, options,
                         cache_dir: str | None = None) -> list[dict]:
    """The records summary.json's ``heldout`` (or ``--heldout``) names, read by sftctl's own
    loaders and checked by the format (errors name file, record and field)."""
    from sftctl.data.sources import load_source, resolve_source

    records: list[dict] = []
    for spec in heldout.get("paths") or []:
        p = Path(spec)
        if run_dir is not None and not p.is_absolute() and (run_dir / p).exists():
            spec = str(run_dir / p)
        ds = load_source(resolve_source(spec), heldout.get("split") or "train",
                         cache_dir=cache_dir, fmt=fmt, options=dict(options))
        records += [dict(r) for r in ds]
    return records


def _messages(msgs: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [{k: v for k, v in m.items() if k in ("role", "content", "tool_calls")
             and v is not None} for m in msgs]


def _load_tokenizer(tokenizer_ref: str, chat_template: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_ref)
    if not getattr(tok, "chat_template", None) and chat_template:
        tok.chat_template = chat_template
    return tok


def user_benchmarks(records: Sequence[Mapping[str, Any]], fmt, options: Mapping[str, Any],
                    tokenizer_ref: str, work_dir: str | Path, *, source: str,
                    limit: int | None = None, chat_template: str | None = None
                    ) -> list[BenchmarkSpec]:
    """Write the two held-out tasks into ``work_dir``; return their specs.

    ``records``: held-out records of format ``fmt`` (pairs from ``fmt.pair``; a record the
    format rejects is an error naming its index). ``tokenizer_ref``: the checkpoint whose
    tokenizer counts reference tokens (and renders chat prompts). ``source``: where the records
    came from, for the report."""
    from sftctl.data.formats import RecordError

    if not records:
        raise ValueError(f"the held-out records ({source}) are empty")
    if not fmt.has_pairs:
        raise ValueError(f"dataset format {fmt.name!r} (plugin {fmt.plugin!r}) gives no "
                         "prompt/reference pairs (DatasetFormat.to_pair): the benchmark of your "
                         "data cannot run for it")
    tok = _load_tokenizer(tokenizer_ref, chat_template)
    rows, kinds = [], set()
    for i, rec in enumerate(records):
        try:
            prompt, reference = fmt.pair(rec, options)
        except RecordError as e:
            raise ValueError(f"held-out record {i} ({source}): {e}") from None
        if not reference.strip():
            raise ValueError(f"held-out record {i} ({source}): empty reference")
        row: dict[str, Any] = {"id": i, "reference": reference}
        if isinstance(prompt, str):
            kinds.add("text")
            row["prompt"] = prompt
            rendered = prompt
        else:
            kinds.add("chat")
            row["messages"] = _messages(prompt)
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"format {fmt.name!r} gives chat prompts and the tokenizer of "
                                 f"{tokenizer_ref} has no chat template")
            rendered = tok.apply_chat_template(row["messages"], add_generation_prompt=True,
                                               tokenize=False)
        n_prompt = len(tok(rendered, add_special_tokens=False)["input_ids"])
        n_whole = len(tok(rendered + reference, add_special_tokens=False)["input_ids"])
        row["ref_tokens"] = max(1, n_whole - n_prompt)
        rows.append(row)
    if len(kinds) > 1:
        raise ValueError(f"format {fmt.name!r} gave both text and chat prompts; one kind per "
                         "data set")
    chat = kinds == {"chat"}
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / DATA_FILE
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    (work_dir / SHIM).write_text(
        "from sftctl.evals.user_tasks import UserGenerateTask, UserNLLTask  # noqa: F401\n",
        encoding="utf-8")
    multiline = sum("\n" in r["reference"] for r in rows)
    until = [] if multiline else ["\n"]
    max_ref = max(r["ref_tokens"] for r in rows)
    max_gen = min(MAX_GEN_TOKS, math.ceil(1.25 * max_ref) + 8)
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": "", "doc_to_target": "{{reference}}",
              "metadata": {"version": 1.0}}
    gen = {"task": GENERATE_TASK, **common, "output_type": "generate_until",
           "generation_kwargs": {"until": until, "do_sample": False, "max_gen_toks": max_gen}}
    nll = {"task": NLL_TASK, **common, "output_type": "loglikelihood_rolling"}
    for name, cfg, cls in ((GENERATE_TASK, gen, "UserGenerateTask"), (NLL_TASK, nll, "UserNLLTask")):
        (work_dir / f"{name}.yaml").write_text(
            "# lm-eval task written by sftctl.evals.user_tasks; data paths are absolute.\n"
            f"class: !function {SHIM[:-3]}.{cls}\n"
            + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    n = len(rows)
    where = f"{n} held-out records ({source})"
    fmt_text = "the model's chat template" if chat else f"the {fmt.name} prompt format"
    stats = {"records": n, "source": source, "format": fmt.name, "prompt": fmt_text,
             "multiline_references": multiline, "stop": until + ["EOS"],
             "max_gen_toks": max_gen, "max_reference_tokens": max_ref,
             "reference_tokens": sum(r["ref_tokens"] for r in rows),
             "tokens_counted_by": str(tokenizer_ref)}
    kw = dict(include_path=str(work_dir), plugin="evals", limit=limit,
              apply_chat_template=chat, chat_template=chat_template if chat else None)
    return [
        BenchmarkSpec(name=GENERATE_TASK, primary_metric="exact_match", stats=stats,
                      description=f"{where}: greedy generation in {fmt_text} (at most {max_gen} "
                                  "new tokens); exact match, normalized match, ROUGE-L, chrF",
                      **kw),
        BenchmarkSpec(name=NLL_TASK, primary_metric="nll_per_token", stats=stats,
                      description=f"{where}: log-likelihood of the references given the prompt; "
                                  "per-token NLL and perplexity (lower is better)", **kw),
    ]


# ------------------------------------------------------------------------------------ metrics


_PUNCT = set(string.punctuation)


def normalize_text(text: str) -> str:
    """Lower case, punctuation (ASCII and Unicode P*) removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if (c in _PUNCT or unicodedata.category(c).startswith("P")) else c
                   for c in text)
    return re.sub(r"\s+", " ", text).strip()


_ROUGE = None


def rouge_l(reference: str, prediction: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"])
    return float(_ROUGE.score(reference, prediction)["rougeL"].fmeasure)


def corpus_chrf(items) -> float:
    """sacrebleu's corpus chrF over (reference, prediction) pairs, 0-100."""
    import sacrebleu

    refs, preds = zip(*items) if items else ((), ())
    return float(sacrebleu.corpus_chrf(list(preds), [list(refs)]).score)


def nll_per_token(items) -> float:
    """Summed negative log-likelihood of the references over their summed tokens."""
    nll = sum(x for x, _ in items)
    n = sum(n for _, n in items)
    return nll / n if n else float("nan")


def token_perplexity(items) -> float:
    return math.exp(nll_per_token(items))


def _mean(items) -> float:
    return sum(items) / len(items) if items else float("nan")


# -------------------------------------------------------------------------------- task classes


def _task_base():
    from .task_class import PythonTask

    return PythonTask


class _HeldOutTask(_task_base()):
    """Context = the record's prompt: verbatim, or its messages in the model's chat template."""

    def fewshot_context(self, doc, num_fewshot, system_instruction=None,
                        apply_chat_template=False, fewshot_as_multiturn=False,
                        chat_template=None, gen_prefix=None, **kwargs):
        if num_fewshot:
            raise ValueError(f"{self.config.task}: the held-out benchmark is zero-shot "
                             f"(num_fewshot={num_fewshot} asked)")
        if doc.get("messages"):
            if not (apply_chat_template and chat_template):
                raise ValueError(f"{self.config.task}: chat prompts are rendered with the "
                                 "model's chat template: run it with apply_chat_template")
            history = [dict(m) for m in doc["messages"]]
            if system_instruction:
                history.insert(0, {"role": "system", "content": system_instruction})
            return chat_template(history, add_generation_prompt=True)
        prompt = doc["prompt"]
        return f"{system_instruction}\n{prompt}" if system_instruction else prompt


class UserGenerateTask(_HeldOutTask):
    def process_results(self, doc, results):
        pred, ref = results[0], doc["reference"]
        return {"exact_match": float(pred.strip() == ref.strip()),
                "normalized_match": float(normalize_text(pred) == normalize_text(ref)),
                "rouge_l": rouge_l(ref, pred),
                "chrf": (ref, pred)}

    def aggregation(self):
        from lm_eval.api.metrics import mean

        return {"exact_match": mean, "normalized_match": mean, "rouge_l": mean,
                "chrf": corpus_chrf}

    def higher_is_better(self):
        return {"exact_match": True, "normalized_match": True, "rouge_l": True, "chrf": True}


class UserNLLTask(_HeldOutTask):
    def construct_requests(self, doc, ctx, **kwargs):
        from lm_eval.api.instance import Instance

        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        return [Instance(request_type="loglikelihood_rolling", doc=doc,
                         arguments=(ctx + doc["reference"],), idx=0, **kwargs),
                Instance(request_type="loglikelihood_rolling", doc=doc,
                         arguments=(ctx,), idx=1, **kwargs)]

    def process_results(self, doc, results):
        whole, prompt = results
        nll = -(float(whole) - float(prompt))
        n = int(doc["ref_tokens"])
        return {"nll_per_token": (nll, n), "perplexity": (nll, n)}

    def aggregation(self):
        return {"nll_per_token": nll_per_token, "perplexity": token_perplexity}

    def higher_is_better(self):
        return {"nll_per_token": False, "perplexity": False}


def heldout_specs(heldout: Mapping[str, Any], cfg, pm, model_ref: str, out_dir: Path, *,
                  run_dir: Path | None = None, limit: int | None = None) -> list[BenchmarkSpec]:
    """The held-out specs of a run (``heldout``: summary.json's ``heldout`` or ``--heldout``),
    for the format and plugin options of ``cfg``; tokens counted by ``model_ref``'s tokenizer,
    whose chat template is also the one a base model without its own gets."""
    from sftctl.errors import ConfigError

    formats = pm.dataset_formats()
    name = cfg.data.format or "alpaca"
    if name not in formats:
        raise ConfigError(f"data.format: unknown dataset format {name!r}; registered: "
                          f"{', '.join(sorted(formats))}")
    fmt = formats[name]
    records = load_heldout_records(heldout, run_dir, fmt, cfg.options, cfg.data.cache_dir)
    template = None
    try:
        from transformers import AutoTokenizer

        template = getattr(AutoTokenizer.from_pretrained(model_ref), "chat_template", None)
    except Exception:  # counted below with the same loader, which then names the problem
        pass
    return user_benchmarks(records, fmt, cfg.options, model_ref,
                           Path(out_dir) / "eval" / "tasks" / "heldout",
                           source=heldout.get("source") or ", ".join(heldout.get("paths") or []),
                           limit=limit if limit is not None else cfg.eval.limit,
                           chat_template=template if isinstance(template, str) else None)
