"""The chat demo's embedded base: a tiny Llama with a BPE tokenizer trained on the demo
conversations rendered with the ChatML template, which the tokenizer carries as its own.

Design choices
- ``<|im_end|>`` is the tokenizer's EOS: it ends every assistant turn, so the trained end marker
  is also what stops generation (lm-eval, transformers, vLLM) with no extra stop string.
- ``<|im_start|>`` is a special token and the role headers (``user\\n`` ...) are single added
  tokens, so a turn costs two tokens of markup; words of the pool are single tokens in their
  three spellings (the answers change case with the system prompt).
- The base ships with the chat template set, so base and SFT model are benchmarked with the
  same prompt format.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import embedded
from . import demo_data
from .templates import CHATML

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "<|im_end|>",
            "unk_token": "<unk>"}
MARKERS = ["<|im_start|>"]
HEADERS = ["system\n", "user\n", "assistant\n"]
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 256
CONFIG = Path(__file__).resolve().parent / "tiny_llama.json"


def _render(msgs: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)


def corpus_texts(records) -> list[str]:
    forms = " ".join(f for w in demo_data.WORDS for f in (w, w.upper(), w.capitalize()))
    return [forms, forms] + [_render(r["messages"]) for r in records]


def build_tokenizer(records=None):
    if records is None:
        records = demo_data.default_splits(seed=0)[0]
    return embedded.train_tokenizer(corpus_texts(records), vocab_size=VOCAB_SIZE,
                                    model_max_length=MODEL_MAX_LENGTH, added_tokens=HEADERS,
                                    special_tokens=MARKERS, specials=SPECIALS,
                                    chat_template=CHATML)


def build_model(tokenizer, seed: int = 0, overrides: dict | None = None):
    cfg = json.loads(CONFIG.read_text(encoding="utf-8"))
    return embedded.build_llama(tokenizer, cfg, seed=seed, overrides=overrides)


def build_default_base(out_dir, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    build_model(tok, seed).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
