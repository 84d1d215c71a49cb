"""Tiny models that the demos build themselves (no download): a byte-level BPE tokenizer trained
on a demo corpus and a randomly initialized Llama sized to it.

Design choices (shared by the built-in demos; see plugins/alpaca/demo_model.py for why each one
helps a tiny model learn in minutes on a CPU)
- Byte-level BPE: every UTF-8 text encodes and decodes back exactly (no UNK for any input).
- Spaces are tokens of their own and every digit is its own token: a word has one id wherever it
  stands, and numbers share ten digit embeddings.
- Fixed pieces of a prompt template (``added_tokens``) are single non-special tokens matched
  before pre-tokenization; marker tokens of a chat template (``special_tokens``) are special
  tokens, so they are never split and the end-of-turn marker can be trained.
- No special token is added by encoding (no BOS/EOS post-processor): formats and templates put
  them where they belong.
- Determinism: BPE training on a fixed corpus order is deterministic, and model initialization
  happens inside ``torch.random.fork_rng`` with the given seed.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# Letters (with an optional leading space), single digits (likewise), runs of other symbols,
# newlines/whitespace. A GPT-2 style split with one digit per piece.
_SPLIT_PATTERN = r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, model_max_length: int,
                    added_tokens: Iterable[str] = (), special_tokens: Iterable[str] = (),
                    specials: dict[str, str] | None = None, chat_template: str | None = None):
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on ``texts`` (see the module doc).

    ``specials``: pad/bos/eos/unk (default ``SPECIAL_TOKENS``; ids 0..3 in that order);
    ``special_tokens``: extra special tokens (chat markers), added after training.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = dict(specials or SPECIAL_TOKENS)
    names = [specials[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=names,  # ids 0..3 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no UNK ever
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    added = [AddedToken(seg, normalized=False, special=False) for seg in added_tokens]
    if added:
        tok.add_tokens(added)
    marks = [AddedToken(s, normalized=False, special=True) for s in special_tokens]
    if marks:
        tok.add_special_tokens(marks)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
        padding_side="right",
        **specials,
    )
    if chat_template is not None:
        out.chat_template = chat_template
    return out


def build_llama(tokenizer, config: dict, seed: int = 0, *, overrides: dict | None = None,
                max_new_tokens: int = 32):
    """A randomly initialized ``LlamaForCausalLM`` from ``config`` (a dict), sized to the
    tokenizer, with a greedy generation config."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = dict(config)
    cfg.update(overrides or {})
    for key in ("pad_token", "bos_token", "eos_token"):
        if getattr(tokenizer, key) is None:
            raise ValueError(f"build_model: the tokenizer has no {key}")
    cfg.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    return model
