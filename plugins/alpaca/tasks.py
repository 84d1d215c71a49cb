"""lm-eval task definitions over an Alpaca-format held-out split (what the alpaca plugin registers).

``alpaca_benchmarks(heldout, work_dir)`` reads the held-out records, writes one JSONL data file
and two lm-eval task YAMLs into ``work_dir`` and returns their :class:`BenchmarkSpec` s:

- ``alpaca_exact_match`` (``generate_until``): the prompt is the record formatted with the Alpaca
  template, exactly as training formats it; greedy decoding stops at the first newline or EOS; the
  score is lm-eval's ``exact_match`` against ``output`` (leading/trailing whitespace ignored).
- ``alpaca_choice`` (``multiple_choice``): the model's log-likelihood of the reference response
  against distractor responses, scored by ``acc`` / ``acc_norm``. Distractors are chosen so that
  only following the *instruction* picks the right one: first other answers on the same input (for
  the embedded demo tasks: the answers of the other tasks on this input, computed by the demo
  generator; for other data: other held-out records with the same input), then answers of the same
  task or instruction on other inputs, then any other answer.

Design choices
- Task YAMLs are written at run time with absolute data paths (``dataset_path: json`` +
  ``data_files``), so lm-eval never looks at the network and the run directory documents exactly
  what was evaluated.
- Prompts are rendered here in Python (``prompt`` field) instead of a Jinja template in the YAML,
  so the evaluated prompt is byte-identical to the training prompt.
- Newline is a stop sequence only when no reference output contains one (else EOS only); the
  choice is recorded in the task's ``stats``. Records without any possible distractor are left
  out of the choice task and counted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import yaml

from sftctl import BenchmarkSpec

__all__ = ["alpaca_benchmarks", "write_alpaca_tasks", "read_alpaca_records", "demo_distractors",
           "EXACT_MATCH_TASK", "CHOICE_TASK"]

EXACT_MATCH_TASK = "alpaca_exact_match"
CHOICE_TASK = "alpaca_choice"
DATA_FILE = "alpaca_heldout_eval.jsonl"

HeldOut = Union[str, Path, Sequence[dict], Callable[[], Union[str, Path, Sequence[dict]]]]


def read_alpaca_records(path: str | Path) -> list[dict]:
    """Read and validate Alpaca records (``instruction``, optional ``input``, ``output``).

    Errors name the file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: held-out file not found")
    out: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON line: {e.msg}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key, required in (("instruction", True), ("input", False), ("output", True)):
                if key not in rec:
                    if required:
                        raise ValueError(f"{path}:{lineno}: missing field {key!r}")
                    rec[key] = ""
                elif not isinstance(rec[key], str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a string, "
                                     f"got {type(rec[key]).__name__}")
            if not rec["instruction"].strip():
                raise ValueError(f"{path}:{lineno}: field 'instruction' is empty")
            if not rec["output"].strip():
                raise ValueError(f"{path}:{lineno}: field 'output' is empty")
            rec["_line"] = lineno
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no records (empty held-out split)")
    return out


def demo_distractors(record: dict) -> list[str]:
    """Answers of the *other* embedded demo tasks on this record's input (instruction-following
    distractors). Empty for records that are not from the demo generator."""
    try:
        from .demo_data import TASKS
    except ImportError:  # demo data not part of this install: generic distractors only
        return []
    task = TASKS.get(record.get("task", ""))
    if task is None or task.kind == "none" or not record.get("input"):
        return []
    if task.kind == "words":
        args: tuple = (record["input"].split(),)
    else:
        try:
            args = tuple(int(t) for t in record["input"].split())
        except ValueError:
            return []
        if len(args) != 2:
            return []
    out = []
    for other in TASKS.values():
        if other.name == task.name or other.kind != task.kind:
            continue
        try:
            out.append(other.answer(*args, 2) if other.max_k else other.answer(*args))
        except Exception:  # a task whose precondition the input misses (e.g. no duplicate)
            continue
    return out


def _choices(records: list[dict], idx: int, n_choices: int, rng: random.Random,
             extra: Callable[[dict], Iterable[str]] | None) -> list[str]:
    """Distractors for records[idx], best first (see module docstring)."""
    rec = records[idx]
    gold = rec["output"]
    tiers: list[list[str]] = [[], [], []]
    if extra is not None:
        tiers[0].extend(extra(rec))
    for j, other in enumerate(records):
        if j == idx:
            continue
        if rec["input"] and other["input"] == rec["input"]:
            tiers[0].append(other["output"])
        elif (rec.get("task") and other.get("task") == rec.get("task")) or \
                other["instruction"] == rec["instruction"]:
            tiers[1].append(other["output"])
        else:
            tiers[2].append(other["output"])
    picked: list[str] = []
    seen = {gold.strip()}
    for tier in tiers:
        tier = list(dict.fromkeys(tier))  # dedupe, keep order
        rng.shuffle(tier)
        for cand in tier:
            if len(picked) == n_choices - 1:
                return picked
            if cand.strip() and cand.strip() not in seen:
                seen.add(cand.strip())
                picked.append(cand)
    return picked


def _load_records(heldout: HeldOut) -> tuple[list[dict], str]:
    if callable(heldout):
        heldout = heldout()
    if isinstance(heldout, (str, Path)):
        return read_alpaca_records(heldout), str(Path(heldout).resolve())
    recs = []
    for i, r in enumerate(heldout):
        if not isinstance(r, dict):
            raise ValueError(f"held-out record {i}: expected a dict, got {type(r).__name__}")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(f"held-out record {i}: field {key!r} missing, not a string or empty")
        if not isinstance(r.get("input", ""), str):
            raise ValueError(f"held-out record {i}: field 'input' must be a string")
        recs.append({**r, "input": r.get("input", ""), "_line": i + 1})
    if not recs:
        raise ValueError("held-out split is empty")
    return recs, "<records in memory>"


def write_alpaca_tasks(heldout: HeldOut, work_dir: str | Path, *, num_choices: int = 4,
                       seed: int = 0, prompt_fn: Callable[[dict], str] | None = None,
                       ) -> dict[str, dict]:
    """Write the data file(s) for both tasks into ``work_dir``; return ``{task name: lm-eval task
    config}`` (each config carries its counts under the key ``sftctl_stats``, which
    :func:`alpaca_benchmarks` moves into the spec before writing the YAML)."""
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices}")
    if prompt_fn is None:
        from .demo_data import format_prompt as prompt_fn
    records, source = _load_records(heldout)
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    rows, no_distractor = [], 0
    multiline = sum("\n" in r["output"] for r in records)
    max_bytes = max(len(r["output"].encode("utf-8")) for r in records)
    for i, rec in enumerate(records):
        distractors = _choices(records, i, num_choices, rng, demo_distractors)
        choices = [rec["output"], *distractors]
        order = list(range(len(choices)))
        rng.shuffle(order)
        rows.append({
            "id": i,
            "line": rec["_line"],
            "instruction": rec["instruction"],
            "input": rec["input"],
            "output": rec["output"],
            "prompt": prompt_fn(rec),
            "choices": [choices[k] for k in order],
            "gold": order.index(0),
        })
        no_distractor += not distractors
    data_path = work_dir / DATA_FILE
    _write_rows(data_path, rows)
    # A record with no possible distractor would be a free point: such records are left out of
    # the choice task (and counted) through their own data file, so the YAML needs no Python.
    choice_path = data_path
    if no_distractor:
        choice_path = work_dir / DATA_FILE.replace(".jsonl", "_choice.jsonl")
        _write_rows(choice_path, [r for r in rows if len(r["choices"]) > 1])

    until = [] if multiline else ["\n"]
    # Tokens <= UTF-8 bytes for byte-level tokenizers; a few extra for EOS and spacing.
    max_gen_toks = min(512, max_bytes + 8)
    common = {"test_split": "test", "doc_to_text": "{{prompt}}"}
    stats = {"records": len(rows), "source": source, "multiline_outputs": multiline}
    em = {"task": EXACT_MATCH_TASK, "dataset_path": "json",
          "dataset_kwargs": {"data_files": {"test": str(data_path)}}, **common,
          "output_type": "generate_until",
          "doc_to_target": "{{output}}",
          "generation_kwargs": {"until": until, "do_sample": False, "max_gen_toks": max_gen_toks},
          "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                           "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
          "metadata": {"version": 1.0},
          "sftctl_stats": {**stats, "stop": until + ["EOS"], "max_gen_toks": max_gen_toks}}
    choice = {"task": CHOICE_TASK, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(choice_path)}}, **common,
              "output_type": "multiple_choice",
              "doc_to_target": "{{gold}}",
              "doc_to_choice": "{{choices}}",
              "target_delimiter": "",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1.0},
              "sftctl_stats": {**stats, "choice_records": len(rows) - no_distractor,
                               "left_out_no_distractor": no_distractor,
                               "num_choices": num_choices}}
    return {EXACT_MATCH_TASK: em, CHOICE_TASK: choice}


def _write_rows(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def alpaca_benchmarks(heldout: HeldOut, work_dir: str | Path, *, limit: int | None = None,
                      num_choices: int = 4, seed: int = 0,
                      prompt_fn: Callable[[dict], str] | None = None) -> list[BenchmarkSpec]:
    """Write the two alpaca tasks (data + YAML) into ``work_dir``; return their specs, for the
    alpaca plugin's ``sftctl_register_benchmarks`` hook::

        for spec in alpaca_benchmarks(heldout_jsonl, run_dir / "eval" / "tasks"):
            register(spec)

    ``heldout``: a JSONL path, a list of records, or a callable returning either. ``prompt_fn``
    formats a record into its prompt (default: the Alpaca template,
    ``template.format_prompt``, as training uses). ``limit`` caps the documents per task.
    """
    work_dir = Path(work_dir).resolve()
    configs = write_alpaca_tasks(heldout, work_dir, num_choices=num_choices, seed=seed,
                                 prompt_fn=prompt_fn)
    specs = []
    descriptions = {
        EXACT_MATCH_TASK: ("greedy generation on the held-out split, exact match with the reference "
                           "(stops at newline or EOS)", "exact_match"),
        CHOICE_TASK: (f"log-likelihood of the reference response against up to {num_choices - 1} "
                      "distractor responses (answers to other instructions on the same input "
                      "first)", "acc"),
    }
    for name, cfg in configs.items():
        stats = cfg.pop("sftctl_stats")
        (work_dir / f"{name}.yaml").write_text(
            "# lm-eval task written by sftctl.evals.alpaca_tasks; data paths are absolute.\n"
            + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
        desc, metric = descriptions[name]
        specs.append(BenchmarkSpec(name=name, include_path=str(work_dir), plugin="alpaca",
                                   description=desc, primary_metric=metric, limit=limit,
                                   stats=stats))
    return specs
