"""Deterministic generator of verifiable instruction tasks in Alpaca format (the embedded demo data).

Every record is ``{"instruction", "input", "output", "task"}``; the answer of each record is computed
from its instruction and input, so a model's answer can be checked by exact match.

Design choices
- Instruction following, not copying: word-list and number inputs are drawn once and then emitted
  under several different tasks (up to three per input), so the same input appears with different
  instructions and different answers. Only the instruction tells the model what to do.
- Balanced mix: each of the tasks gets a quota of ``n // len(TASKS)`` records (the remainder goes to
  tasks picked at random), and the tasks that share an input are the ones with the most quota left,
  so no single task dominates and the counts differ by at most one.
- Several phrasings per task, and two prompt forms: most tasks have an ``input``; ``repeat_word`` and
  ``count_up`` carry everything in the instruction and have ``input == ""`` (Alpaca's no-input
  template).
- Outputs are single-line and never start with whitespace, because exact-match generation stops at
  the first newline or EOS.
- A small closed word pool (lowercase, 3-7 letters, several shared prefixes so that alphabetical
  sorting is not decided by the first letter alone) keeps the per-word mappings (uppercase,
  capitalize) learnable by a tiny model trained for a few minutes; held-out inputs are new
  combinations of the same words.
- Determinism without global state: all randomness comes from a ``random.Random`` built from the
  seed (and, for the splits, from a string derived from it), never from the ``random`` module state.
- Held-out split: generated first, then the training split is generated with the held-out *inputs*
  (for no-input tasks: the task parameters) excluded, so no held-out prompt (not even one with a
  different phrasing or a different instruction on the same input) occurs in training. Re-drawn
  inputs are counted in :class:`GenerationStats`, nothing is dropped silently.
"""

from __future__ import annotations

from .template import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, format_prompt  # noqa: F401

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "ALPACA_PROMPT_WITH_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "TASKS",
    "WORDS",
    "DEFAULT_N_TRAIN",
    "DEFAULT_N_HELDOUT",
    "GenerationStats",
    "format_prompt",
    "generate",
    "generate_with_stats",
    "default_splits",
    "write_jsonl",
    "read_jsonl",
    "record_key",
]

# The Stanford Alpaca prompt templates, verbatim. The response follows directly, then EOS.

# Sizes of the default splits (kept equal to default_config.yaml; a test checks it).
DEFAULT_N_TRAIN = 24000
DEFAULT_N_HELDOUT = 260

# 64 lowercase words. Groups with shared prefixes (pe-, pi-, pl-, ca-, ma-, ...) make sorting need
# more than the first letter.
WORDS: tuple[str, ...] = (
    "apple", "anchor", "basket", "bread", "bottle", "candle", "castle", "cloud", "cotton",
    "dance", "desert", "dragon", "eagle", "engine", "field", "finger", "forest", "frost",
    "garden", "grape", "green", "guitar", "hammer", "helmet", "house", "island", "jacket",
    "jelly", "jungle", "kettle", "kitten", "ladder", "lemon", "lizard", "mango", "maple",
    "mirror", "monkey", "needle", "night", "ocean", "orange", "pencil", "pepper", "piano",
    "pillow", "planet", "plum", "queen", "rabbit", "river", "rocket", "silver", "spider",
    "stone", "tiger", "tomato", "turtle", "valley", "violin", "wallet", "water", "window",
    "zebra",
)

MIN_WORDS, MAX_WORDS = 3, 5      # length of a word-list input
MAX_NUMBER = 49                  # numbers in number inputs are in [0, MAX_NUMBER]
MAX_COUNT_START = 40             # count_up starts in [0, MAX_COUNT_START], spans 3..6 numbers
SHARE = {"words": 3, "numbers": 3}  # tasks emitted per drawn input, by input kind


def _plural(k: int, word: str) -> str:
    return word if k == 1 else word + "s"


@dataclass(frozen=True)
class Task:
    """One verifiable task: how its input is drawn, its phrasings and its answer."""

    name: str
    kind: str                  # "words", "numbers" or "none" (no input)
    phrasings: tuple[str, ...]
    answer: Callable[..., str]
    needs_duplicate: bool = False  # input must contain a repeated word
    max_k: int = 0                 # tasks with a size parameter k in 1..max_k (first/last k words)


def _unique(words: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("reverse_words", "words", (
        "Reverse the order of the words.",
        "Write the words in reverse order.",
        "List the words from last to first.",
        "Put the words in the opposite order.",
    ), lambda ws: " ".join(reversed(ws))),
    Task("sort_words", "words", (
        "Sort the words alphabetically.",
        "Arrange the words in alphabetical order.",
        "Put the words in order from A to Z.",
        "List the words sorted alphabetically.",
    ), lambda ws: " ".join(sorted(ws))),
    Task("uppercase", "words", (
        "Convert the words to uppercase.",
        "Write the words in capital letters.",
        "Rewrite the text in all caps.",
        "Make every letter uppercase.",
    ), lambda ws: " ".join(w.upper() for w in ws)),
    Task("capitalize", "words", (
        "Capitalize each word.",
        "Make the first letter of every word uppercase.",
        "Write each word with an initial capital letter.",
        "Rewrite the words in title case.",
    ), lambda ws: " ".join(w.capitalize() for w in ws)),
    Task("first_k", "words", (
        "Return the first {k} {words}.",
        "Give only the first {k} {words} of the input.",
        "Keep the first {k} {words} and drop the rest.",
    ), lambda ws, k: " ".join(ws[:k]), max_k=3),
    Task("last_k", "words", (
        "Return the last {k} {words}.",
        "Give only the last {k} {words} of the input.",
        "Keep the last {k} {words} and drop the rest.",
    ), lambda ws, k: " ".join(ws[-k:]), max_k=3),
    Task("count_words", "words", (
        "Count the words.",
        "How many words are in the input?",
        "Tell me the number of words.",
        "How many words does the text contain?",
    ), lambda ws: str(len(ws))),
    Task("dedup_words", "words", (
        "Remove the duplicate words.",
        "Delete repeated words, keeping the first occurrence.",
        "Write each word only once, in the original order.",
        "Drop every word that already appeared earlier.",
    ), lambda ws: " ".join(_unique(ws)), needs_duplicate=True),
    Task("add", "numbers", (
        "Add the two numbers.",
        "What is the sum of the two numbers?",
        "Compute the total of the numbers.",
        "Add the numbers together.",
    ), lambda a, b: str(a + b)),
    Task("smaller", "numbers", (
        "Which number is smaller?",
        "Return the smaller of the two numbers.",
        "Give the lower number.",
        "Write the minimum of the two numbers.",
    ), lambda a, b: str(min(a, b))),
    Task("larger", "numbers", (
        "Which number is larger?",
        "Return the larger of the two numbers.",
        "Give the bigger number.",
        "Write the maximum of the two numbers.",
    ), lambda a, b: str(max(a, b))),
    Task("repeat_word", "none", (
        "Repeat the word {w} {k} times.",
        "Write the word {w} {k} times, separated by spaces.",
        "Say {w} exactly {k} times.",
    ), lambda w, k: " ".join([w] * k)),
    Task("count_up", "none", (
        "Count from {a} to {b}.",
        "List the numbers from {a} to {b}.",
        "Write every number from {a} up to {b}.",
    ), lambda a, b: " ".join(str(i) for i in range(a, b + 1))),
)}


@dataclass
class GenerationStats:
    """What a generation run did besides emitting records (so nothing happens unseen)."""

    records: int = 0
    inputs_drawn: int = 0
    redrawn_excluded: int = 0   # draws rejected because the input/parameters are in `exclude`
    redrawn_duplicate: int = 0  # draws rejected because `unique=True` and already emitted
    per_task: dict[str, int] = field(default_factory=dict)


def record_key(record: dict) -> str:
    """What makes two records 'the same question' for split disjointness.

    With an input: the input text itself (any instruction on it counts as seen). Without one: the
    task and the numbers/words of the instruction, independent of the phrasing.
    """
    if record["input"]:
        return "input:" + record["input"]
    task = TASKS.get(record.get("task", ""))
    if task is None:
        return "instruction:" + record["instruction"]
    # Task parameters are the words and numbers of the instruction that are not phrasing words.
    fixed = set()
    for p in task.phrasings:
        fixed.update(p.replace(".", " ").replace(",", " ").split())
    params = [t for t in record["instruction"].rstrip(".").replace(",", " ").split() if t not in fixed]
    return f"{task.name}:" + " ".join(params)


def _draw_words(rng: random.Random, need_dup: bool, min_len: int) -> list[str]:
    n = rng.randint(max(MIN_WORDS, min_len), MAX_WORDS)
    words = rng.sample(WORDS, n)
    if need_dup:
        # Copy one or two words onto other positions; the result always has a repeat.
        for _ in range(rng.choice((1, 1, 2))):
            src, dst = rng.sample(range(n), 2)
            words[dst] = words[src]
    return words


def _draw_numbers(rng: random.Random) -> tuple[int, int]:
    a = rng.randint(0, MAX_NUMBER)
    b = rng.randint(0, MAX_NUMBER - 1)
    if b >= a:  # distinct, so "larger" and "smaller" are never ambiguous
        b += 1
    return a, b


def _no_input_record(task: Task, rng: random.Random) -> dict:
    phrasing = rng.choice(task.phrasings)
    if task.name == "repeat_word":
        w, k = rng.choice(WORDS), rng.randint(2, 5)
        instr, out = phrasing.format(w=w, k=k), task.answer(w, k)
    else:  # count_up
        a = rng.randint(0, MAX_COUNT_START)
        b = a + rng.randint(2, 5)
        instr, out = phrasing.format(a=a, b=b), task.answer(a, b)
    return {"instruction": instr, "input": "", "output": out, "task": task.name}


def _input_records(tasks: list[Task], rng: random.Random, exclude: set[str], used: set[str],
                   stats: GenerationStats, unique: bool) -> list[dict]:
    kind = tasks[0].kind
    # First/last-k parameters are chosen before the input so that the input is long enough.
    ks = {t.name: rng.randint(1, t.max_k) for t in tasks if t.max_k}
    for _ in range(10_000):
        if kind == "words":
            values = _draw_words(rng, any(t.needs_duplicate for t in tasks),
                                 max(ks.values(), default=0) + 1)
            text = " ".join(values)
        else:
            values = _draw_numbers(rng)
            text = f"{values[0]} {values[1]}"
        stats.inputs_drawn += 1
        if "input:" + text in exclude:
            stats.redrawn_excluded += 1
            continue
        if unique and "input:" + text in used:
            stats.redrawn_duplicate += 1
            continue
        break
    else:  # pragma: no cover - only with an exclude set covering nearly all inputs
        raise RuntimeError(f"demo_data: could not draw a new {kind} input in 10000 tries")
    used.add("input:" + text)
    out = []
    for t in tasks:
        phrasing = rng.choice(t.phrasings)
        if t.max_k:
            k = ks[t.name]
            instr = phrasing.format(k=k, words=_plural(k, "word"))
            answer = t.answer(values, k)
        else:
            instr = phrasing
            answer = t.answer(*values) if kind == "numbers" else t.answer(values)
        out.append({"instruction": instr, "input": text, "output": answer, "task": t.name})
    return out


def generate_with_stats(n: int, seed: int, *, exclude: Iterable[str] = (), unique: bool = False,
                        tasks: Iterable[str] | None = None) -> tuple[list[dict], GenerationStats]:
    """Generate ``n`` records (see :func:`generate`) and report what the generator did.

    ``exclude`` holds :func:`record_key` values that must not occur; ``unique=True`` also forbids
    repeating a key inside this call; ``tasks`` restricts the mix (default: all of :data:`TASKS`).
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"demo_data.generate: n must be a non-negative int, got {n!r}")
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"demo_data.generate: unknown tasks {unknown} (known: {', '.join(TASKS)})")
    rng = random.Random(f"sftctl-demo:{seed}")
    exclude = set(exclude)
    used: set[str] = set()
    stats = GenerationStats()

    # Quotas: equal shares, the remainder to randomly chosen tasks.
    quota = {t: n // len(names) for t in names}
    for t in rng.sample(names, n % len(names)):
        quota[t] += 1

    records: list[dict] = []
    while True:
        left = {t: q for t, q in quota.items() if q > 0}
        if not left:
            break
        # Pick the input kind in proportion to the quota left, then the tasks of that kind with
        # the most quota left (random tie-break) share one drawn input.
        kinds = sorted({TASKS[t].kind for t in left})
        weights = [sum(q for t, q in left.items() if TASKS[t].kind == k) for k in kinds]
        kind = rng.choices(kinds, weights)[0]
        if kind == "none":
            name = rng.choices([t for t in left if TASKS[t].kind == "none"],
                               [q for t, q in left.items() if TASKS[t].kind == "none"])[0]
            for _ in range(10_000):
                rec = _no_input_record(TASKS[name], rng)
                key = record_key(rec)
                stats.inputs_drawn += 1
                if key in exclude:
                    stats.redrawn_excluded += 1
                elif unique and key in used:
                    stats.redrawn_duplicate += 1
                else:
                    break
            else:
                raise RuntimeError(f"demo_data: could not draw a new {name} instruction in 10000 "
                                   "tries (too many records requested with unique=True?)")
            used.add(key)
            group = [rec]
        else:
            cands = [t for t in left if TASKS[t].kind == kind]
            order = sorted(cands, key=lambda t: (-left[t], rng.random()))
            chosen = [TASKS[t] for t in order[: SHARE[kind]]]
            group = _input_records(chosen, rng, exclude, used, stats, unique)
        for rec in group:
            quota[rec["task"]] -= 1
            stats.per_task[rec["task"]] = stats.per_task.get(rec["task"], 0) + 1
        records.extend(group)

    rng.shuffle(records)  # records of one input are not adjacent
    stats.records = len(records)
    return records, stats


def generate(n: int, seed: int, **kwargs) -> list[dict]:
    """``n`` Alpaca records ``{"instruction", "input", "output", "task"}``, deterministic in ``seed``."""
    return generate_with_stats(n, seed, **kwargs)[0]


def default_splits(seed: int = 0, n_train: int | None = None, n_heldout: int | None = None,
                   ) -> tuple[list[dict], list[dict]]:
    """The embedded default's (train, heldout) records.

    The held-out split has unique keys; the training split excludes every held-out key (same input
    or same no-input task parameters), so no held-out prompt is seen during training.
    """
    n_train = DEFAULT_N_TRAIN if n_train is None else n_train
    n_heldout = DEFAULT_N_HELDOUT if n_heldout is None else n_heldout
    heldout = generate(n_heldout, seed=f"{seed}/heldout", unique=True)  # type: ignore[arg-type]
    keys = {record_key(r) for r in heldout}
    train = generate(n_train, seed=f"{seed}/train", exclude=keys)  # type: ignore[arg-type]
    return train, heldout


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write records one JSON object per line (UTF-8); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Read records written by :func:`write_jsonl`; a bad line is an error naming file and line."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON line: {e.msg}") from None
    return out
