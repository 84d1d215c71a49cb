"""Built-in plugin ``alpaca``: the Stanford Alpaca format, its demo data and benchmarks.

Design choices
- Records are ``{"instruction", "input" (optional), "output"}``; the prompt is the Stanford
  Alpaca template (with or without the input block) from ``template.py`` and the response is
  ``output`` (then EOS, added by the data pipeline). Only the response is trained by default.
- Strict types: ``instruction`` and ``output`` must be non-empty strings and ``input`` a string
  or absent/null. A number where text is expected is an error, not silently stringified.
- Demo data: the deterministic generator (``demo_data.default_splits``): the
  training split trains, the held-out split is the validation set and the benchmark data.
  Sizes and seed are plugin options (``alpaca.demo_*``); the tuned training defaults for the
  embedded model live in ``default_config.yaml``, its base model in ``demo_model.py``.
- Benchmarks (run by ``sftctl.evals`` after training): exact match by greedy generation and a
  log-likelihood choice task over the held-out split (``tasks.py``). With the
  demo data they use the held-out split; with user data, the JSONL file named by the
  ``alpaca.heldout`` option.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from sftctl import ConfigOption, DatasetFormat, RecordError, Segment, hookimpl

log = logging.getLogger("sftctl")

FORMAT = "alpaca"


HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "default_config.yaml"  # the tuned defaults for the embedded model


def _text(record, name: str, *, required: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError(name, "missing")
        return ""
    if not isinstance(value, str):
        raise RecordError(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if required and not value.strip():
        raise RecordError(name, "empty response" if name == "output" else "empty text")
    return value


def to_segments(record) -> list[Segment]:
    from .demo_data import format_prompt

    instruction = _text(record, "instruction", required=True)
    inp = _text(record, "input", required=False)
    output = _text(record, "output", required=True)
    prompt = format_prompt({"instruction": instruction, "input": inp})
    return [Segment(prompt, False), Segment(output, True)]


@functools.lru_cache(maxsize=4)
def _splits(seed: int, n_train: int | None, n_heldout: int | None):
    from .demo_data import default_splits

    return default_splits(seed=seed, n_train=n_train, n_heldout=n_heldout)


def demo_records(config) -> dict:
    # not named demo_data: importing the submodule .demo_data rebinds that package attribute
    train, heldout = _splits(config.option("alpaca.demo_seed"),
                             config.option("alpaca.demo_train_size"),
                             config.option("alpaca.demo_heldout_size"))
    return {"train": train, "validation": heldout}


def demo_base(out_dir, seed: int = 0) -> None:
    """The embedded base model: the tiny Llama of ``tiny_llama.json`` with the BPE tokenizer
    trained on this plugin's demo corpus (``demo_model.py``)."""
    from .demo_model import build_default_base

    build_default_base(out_dir, seed=seed)


@hookimpl
def sftctl_add_options(register):
    register(ConfigOption("alpaca.demo_seed", int, 0, "Seed of the alpaca demo data generator."))
    register(ConfigOption("alpaca.demo_train_size", int, None,
                          "Training records of the alpaca demo data (default: the generator's)."))
    register(ConfigOption("alpaca.demo_heldout_size", int, None,
                          "Held-out records of the alpaca demo data (default: the generator's)."))
    register(ConfigOption("alpaca.heldout", str, None,
                          "Alpaca JSONL file to benchmark after training when --data is given "
                          "(default with --data: no alpaca benchmark)."))


@hookimpl
def sftctl_register_dataset_formats(register):
    register(DatasetFormat(
        name=FORMAT,
        to_segments=to_segments,
        fields={"instruction": "the task (non-empty string)",
                "input": "optional context (string; may be empty or absent)",
                "output": "the response to learn (non-empty string)"},
        required=("instruction", "output"),
        description="Stanford Alpaca: instruction, optional input, output (prompt template "
                    "with and without input)",
        demo_data=demo_records,
        demo_config=str(DEFAULT_CONFIG),
        demo_base=demo_base,
    ))


@hookimpl
def sftctl_register_benchmarks(register, config):
    if config.data.format != FORMAT or config.train.output_dir is None:
        return
    from .demo_data import write_jsonl
    from .tasks import alpaca_benchmarks

    eval_dir = Path(config.train.output_dir) / "eval"
    heldout = config.option("alpaca.heldout")
    if heldout is None:
        if config.data.paths:
            # the held-out records of the user's data are benchmarked by the generic task
            # (sftctl.evals.user_tasks); alpaca.heldout adds alpaca's own two tasks
            log.info("alpaca: the held-out records of --data are benchmarked by sftctl's "
                     "generic task; --alpaca-heldout FILE adds alpaca_exact_match/alpaca_choice")
            return
        _, records = _splits(config.option("alpaca.demo_seed"),
                             config.option("alpaca.demo_train_size"),
                             config.option("alpaca.demo_heldout_size"))
        heldout = write_jsonl(records, eval_dir / "alpaca_heldout.jsonl")
    for spec in alpaca_benchmarks(heldout, eval_dir / "tasks", limit=config.eval.limit):
        register(spec)
