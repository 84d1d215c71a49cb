"""lm-eval tasks over held-out conversations (what the chat plugin registers as benchmarks).

``chat_benchmarks(heldout, work_dir)`` writes one JSONL data file and one task YAML into
``work_dir`` and returns its ``BenchmarkSpec``:

- ``chat_multiturn_exact_match`` (``generate_until``): each held-out conversation minus its last
  assistant answer is the prompt, rendered by the *evaluated model's* chat template through
  lm-eval's own chat-template support (``apply_chat_template=True``); greedy decoding; the score
  is exact match of the last answer. The prompt holds every earlier turn, so the score is a
  multi-turn score: the demo's last answers depend on turn 1 and on the system prompt.

Design choices
- Stock lm-eval builds a chat prompt from a system message, few-shot pairs and one user turn;
  a held-out conversation has its own history, so the task is a small ``ConfigurableTask``
  subclass (``MultiTurnTask``, loaded by the YAML's ``class: !function``) whose context is
  ``chat_template(history)``: lm-eval still renders it with the model's template, and
  everything else (generation, metrics, logging of samples) is lm-eval's.
- Data paths are absolute and the task file is written at run time, so lm-eval never looks at
  the network and the run directory documents what was evaluated.
- The spec carries the run's template (``chat_template``): a base model whose tokenizer has
  none is evaluated with the template the SFT model was trained with, so both see the same
  prompt format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from sftctl import BenchmarkSpec

EXACT_MATCH_TASK = "chat_multiturn_exact_match"
DATA_FILE = "chat_heldout_eval.jsonl"
SHIM = "chat_multiturn_task.py"


def _messages(conv: dict) -> list[dict]:
    return [{k: v for k, v in m.items() if k in ("role", "content", "tool_calls",
                                                   "reasoning_content")}
            for m in conv]


def eval_rows(conversations: Sequence[list[dict]]) -> list[dict]:
    """``{"history": messages before the last answer, "answer": its text}`` per conversation
    (``conversations``: parsed message lists ending with an assistant turn)."""
    rows = []
    for conv in conversations:
        if not conv or conv[-1]["role"] != "assistant":
            raise ValueError("a held-out conversation must end with an assistant turn")
        rows.append({"history": _messages(conv[:-1]), "answer": conv[-1]["content"]})
    return rows


def chat_benchmarks(conversations: Sequence[list[dict]], work_dir: str | Path, *,
                    chat_template: str | None, limit: int | None = None,
                    source: str = "held-out conversations") -> list[BenchmarkSpec]:
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = eval_rows(conversations)
    data = work_dir / DATA_FILE
    with data.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (work_dir / SHIM).write_text("from sftctl.plugins.chat.tasks import MultiTurnTask  # noqa\n",
                                 encoding="utf-8")
    multiline = any("\n" in r["answer"] for r in rows)
    cfg: dict[str, Any] = {
        "task": EXACT_MATCH_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [] if multiline else ["\n"], "do_sample": False,
                              "max_gen_toks": max(16, 2 * max(len(r["answer"]) for r in rows))},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                         "higher_is_better": True, "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
        "metadata": {"version": 1.0},
    }
    (work_dir / f"{EXACT_MATCH_TASK}.yaml").write_text(
        f"class: !function {SHIM[:-3]}.MultiTurnTask\n" +
        yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return [BenchmarkSpec(name=EXACT_MATCH_TASK, include_path=str(work_dir),
                          description=f"last answer of {len(rows)} {source}, exact match, "
                                      "prompt = the conversation so far in the chat template",
                          primary_metric="exact_match", limit=limit,
                          apply_chat_template=True, chat_template=chat_template,
                          stats={"conversations": len(rows),
                                 "stop_at_newline": not multiline})]


def _task_base():
    from sftctl.evals.task_class import PythonTask

    return PythonTask


class MultiTurnTask(_task_base()):
    """A generate_until task whose context is the doc's ``history`` in the model's template."""

    def fewshot_context(self, doc, num_fewshot, system_instruction=None,
                        apply_chat_template=False, fewshot_as_multiturn=False,
                        chat_template=None, gen_prefix=None, **kwargs):
        if not (apply_chat_template and chat_template):
            raise ValueError(f"{EXACT_MATCH_TASK} renders conversations with the model's chat "
                             "template: run it with apply_chat_template")
        history = [dict(m) for m in doc["history"]]
        if system_instruction:
            history.insert(0, {"role": "system", "content": system_instruction})
        return chat_template(history, add_generation_prompt=True)
