"""The Stanford Alpaca prompt template (with and without the input block): the one place that
defines how an Alpaca record becomes a prompt, for training, the demo tokenizer and the
benchmarks alike (so the three see byte-identical prompts)."""

from __future__ import annotations

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(record: dict) -> str:
    """The Alpaca prompt of a record (the response follows directly, then EOS)."""
    if record.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])
