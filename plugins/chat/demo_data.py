"""Deterministic multi-turn demo conversations (the chat plugin's embedded default data).

Every conversation is ``{"messages": [...]}`` in the OpenAI layout and its answers are computed,
so a model's last answer can be checked by exact match.

Design choices
- Answers depend on earlier turns: turn 1 gives a word to remember; up to three later turns
  either ask for something else or for the word back (or for it twice), and the last turn
  always asks for the word. Only a model that reads the history answers it.
- The system prompt changes the answer: none (as given), uppercase, or capitalized; it applies
  to every answer after turn 1, so the model must carry it across the conversation.
- Several phrasings per request, a small closed word pool (so a tiny model learns the per-word
  case mappings in minutes), single-line answers that never start with whitespace.
- Held-out split: generated first; training conversations never reuse a held-out
  (system, word, middle request) combination, so held-out prompts are new.
- Determinism without global state: every draw comes from ``random.Random`` seeded from the
  arguments.
"""

from __future__ import annotations

import random

WORDS = ["amber", "basil", "cedar", "delta", "ember", "fable", "grove", "harbor", "ivory",
         "jasper", "kettle", "lemon", "maple", "nectar", "olive", "pepper", "quartz", "raven",
         "saffron", "tulip", "umber", "velvet", "willow", "yarrow", "zephyr", "bramble", "copper",
         "dune", "fern", "garnet"]

SYSTEMS = {  # system prompt -> how later answers are written
    None: lambda s: s,
    "Answer in uppercase.": str.upper,
    "Write every answer in capital letters.": str.upper,
    "Capitalize each word of your answers.": lambda s: " ".join(w.capitalize()
                                                               for w in s.split(" ")),
}

REMEMBER = ["Remember the word {w}.", "Please keep the word {w} in mind.",
            "My secret word is {w}."]
ACK = "OK, I will remember it."
RECALL = ["What was the word?", "Tell me the word again.", "Which word did I ask you to keep?"]
RECALL_TWICE = ["Say the word twice.", "Repeat the word two times."]


def _middle(rng: random.Random) -> tuple[str, str]:
    """A request that does not involve the remembered word, and its plain answer."""
    words = rng.sample(WORDS, rng.randint(2, 3))
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(["Reverse these words: {x}", "Say these words backwards: {x}"]).format(
            x=" ".join(words)), " ".join(reversed(words))
    if kind == 1:
        return rng.choice(["What is the first word of: {x}", "Give the first word: {x}"]).format(
            x=" ".join(words)), words[0]
    return rng.choice(["What is the last word of: {x}", "Give the last word: {x}"]).format(
        x=" ".join(words)), words[-1]


def _recall(rng: random.Random, word: str) -> tuple[str, str]:
    if rng.random() < 0.25:
        return rng.choice(RECALL_TWICE), f"{word} {word}"
    return rng.choice(RECALL), word


def conversation(rng: random.Random) -> tuple[dict, tuple]:
    """One conversation and its key (system, word, middle requests) for the held-out split."""
    system = rng.choice(list(SYSTEMS))
    style = SYSTEMS[system]
    word = rng.choice(WORDS)
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs += [{"role": "user", "content": rng.choice(REMEMBER).format(w=word)},
             {"role": "assistant", "content": ACK}]
    middles = []
    for _ in range(rng.choice([1, 2, 2, 3])):
        if rng.random() < 0.5:  # a middle request unrelated to the word
            q, a = _middle(rng)
            middles.append(q)
        else:                   # asked for the word (more recall signal per conversation)
            q, a = _recall(rng, word)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": style(a)}]
    q, a = _recall(rng, word)
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": style(a)}]
    return {"messages": msgs}, (system, word, tuple(middles))


def generate(n: int, seed: int, exclude: set | None = None) -> tuple[list[dict], set]:
    rng = random.Random(f"sftctl-chat-demo-{seed}")
    out, keys = [], set()
    exclude = exclude or set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"chat demo: cannot draw {n} conversations outside the held-out "
                               "split (the pool is too small)")
        rec, key = conversation(rng)
        if key in exclude:
            continue
        out.append(rec)
        keys.add(key)
    return out, keys


DEFAULT_N_TRAIN = 12000
DEFAULT_N_HELDOUT = 200


def default_splits(seed: int = 0, n_train: int | None = None,
                   n_heldout: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the held-out conversations' keys never occur in training."""
    heldout, keys = generate(n_heldout or DEFAULT_N_HELDOUT, seed=seed * 2 + 1)
    train, _ = generate(n_train or DEFAULT_N_TRAIN, seed=seed * 2, exclude=keys)
    return train, heldout
