"""The embedded default's tokenizer and tiny Llama model, built by the project (no hub download).

Design choices
- Tokenizer: a byte-level BPE trained with the ``tokenizers`` library on the Alpaca-formatted demo
  corpus. Byte-level means every UTF-8 text encodes and decodes back exactly (no UNK for any
  input); trained on the corpus means the instruction words and every word of the demo pool (in
  lower, upper and capitalized spelling) are single tokens.
- Spaces are tokens of their own (``"plum stone"`` -> ``plum``, ``Ġ``, ``stone``): a word has one
  token id wherever it stands. With GPT-2 style ``Ġword`` tokens the first word of an input or an
  answer (after a newline, no space) is a different id from the same word later on, so even a
  plain copy needs a learned id-to-id map; measured in bench/results/default_tuning.md, this and
  the template tokens below took held-out exact match from ~0.2 to ~0.7 at equal steps.
- The fixed pieces of the two Alpaca templates (the preamble up to ``### Instruction:\n``,
  ``\n\n### Input:\n``, ``\n\n### Response:\n``) are added tokens, matched before
  pre-tokenization and decoded to their exact text, like the role markers of a chat template. The
  prompt then costs 3 template tokens instead of ~40, so an example is ~28 tokens, not ~58.
- Every digit is its own token (``42`` -> ``4``, ``2``): numbers share ten digit embeddings, which
  is what lets a small model learn arithmetic at all.
- No special token is added by encoding (no BOS/EOS post-processor): the trainer appends EOS itself
  and lm-eval encodes prompts with ``add_special_tokens=False``, so training and evaluation see
  identical token sequences. ``bos``/``eos``/``pad``/``unk`` are still defined (ids 1, 2, 0, 3).
- Splitting the regex on letters/digits/punctuation/whitespace keeps "prompt ends with a newline,
  response starts with a word" a token boundary: encoding prompt and response separately gives
  the same ids as encoding their concatenation (tested).
- Determinism: the corpus comes from :func:`sftctl.plugins.alpaca.demo_data.default_splits` with a fixed seed and
  BPE training with a fixed corpus order is deterministic; a test builds the tokenizer twice and
  compares the vocabularies and merges.
- Model: ``transformers.LlamaForCausalLM`` from ``configs/tiny_llama.json`` shipped in the package,
  vocabulary size and special-token ids taken from the tokenizer. Initialization happens inside
  ``torch.random.fork_rng`` with the given seed, so building a model neither depends on nor changes
  the caller's global RNG state.
- Weights are saved as safetensors through ``save_pretrained`` so the trainer loads the base model
  through the ordinary ``from_pretrained`` path, exactly as it would a hub model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .. import embedded
from . import demo_data

__all__ = [
    "SPECIAL_TOKENS",
    "TOKENIZER_VOCAB_SIZE",
    "load_model_config",
    "build_tokenizer",
    "build_model",
    "build_default_base",
]

SPECIAL_TOKENS = embedded.SPECIAL_TOKENS
# Upper bound; BPE stops earlier when no pair occurs twice (about 1000 tokens on the demo corpus).
TOKENIZER_VOCAB_SIZE = 4096
TOKENIZER_CORPUS_SEED = 0
MODEL_MAX_LENGTH = 256
CONFIG_DIR = Path(__file__).resolve().parent  # model configs (*.json) shipped as package data

def load_model_config(name: str = "tiny_llama") -> dict:
    """The JSON model config shipped in this plugin folder (``<name>.json``) as a dict."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        avail = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no model config {name!r} in {CONFIG_DIR} (available: {avail})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def _corpus_texts(records: Iterable[dict]) -> Iterable[str]:
    yield demo_data.ALPACA_PROMPT_WITH_INPUT
    yield demo_data.ALPACA_PROMPT_NO_INPUT
    # Every pool word in its three spellings, twice (min_frequency=2): single tokens even when a
    # small corpus happens to lack one.
    forms = " ".join(f for w in demo_data.WORDS for f in (w, w.upper(), w.capitalize()))
    yield forms
    yield forms
    for i, rec in enumerate(records):
        for f in ("instruction", "input", "output"):
            if not isinstance(rec.get(f, ""), str):
                raise ValueError(f"tokenizer corpus record {i}: field {f!r} must be a string, "
                                 f"got {type(rec.get(f)).__name__}")
        yield demo_data.format_prompt(rec) + rec.get("output", "")


def template_segments() -> list[str]:
    """The fixed pieces of the two Alpaca templates (text between the placeholders)."""
    segs = []
    for tpl in (demo_data.ALPACA_PROMPT_WITH_INPUT, demo_data.ALPACA_PROMPT_NO_INPUT):
        head, rest = tpl.split("{instruction}")
        segs.append(head)
        for piece in rest.split("{input}"):
            if piece not in segs:
                segs.append(piece)
    return segs


def build_tokenizer(corpus_records: Iterable[dict] | None = None, *,
                    vocab_size: int = TOKENIZER_VOCAB_SIZE):
    """Train the byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    ``corpus_records``: Alpaca records (``instruction``, ``input``, ``output``); default the
    training split of :func:`sftctl.plugins.alpaca.demo_data.default_splits` (seed 0). The
    template pieces become single (non-special) tokens, matched before pre-tokenization, like
    the role markers of a chat template: they decode to their exact text.
    """
    if corpus_records is None:
        corpus_records = demo_data.default_splits(seed=TOKENIZER_CORPUS_SEED)[0]
    return embedded.train_tokenizer(_corpus_texts(corpus_records), vocab_size=vocab_size,
                                    added_tokens=template_segments(),
                                    model_max_length=MODEL_MAX_LENGTH)


def build_model(tokenizer, seed: int = 0, *, config_name: str = "tiny_llama",
                overrides: dict | None = None):
    """A randomly initialized ``LlamaForCausalLM`` from the shipped config, sized to ``tokenizer``.

    ``overrides`` replaces config keys (used by bench/tune_default.py to try other sizes).
    """
    return embedded.build_llama(tokenizer, load_model_config(config_name), seed=seed,
                                overrides=overrides)


def build_default_base(out_dir: str | Path, seed: int = 0, *, config_name: str = "tiny_llama",
                       corpus_records: Iterable[dict] | None = None) -> Path:
    """Write the untrained base model, tokenizer and generation config to ``out_dir``.

    The directory is a standard Hugging Face checkpoint (``config.json``, ``model.safetensors``,
    tokenizer files, ``generation_config.json``) that ``from_pretrained`` loads.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus_records)
    model = build_model(tokenizer, seed, config_name=config_name)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
