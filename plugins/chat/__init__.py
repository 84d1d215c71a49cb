"""Built-in plugin ``chat``: conversations formatted by the model's chat template, with exact
assistant-only masks.

Design choices
- One dataset format, ``chat``, for three layouts (OpenAI ``messages``, ShareGPT
  ``conversations``, conversational ``prompt``/``completion``), detected per record from its
  keys or fixed with ``--chat-layout``; field and role names can be remapped
  (``conversation.py``).
- The template is the tokenizer's own chat template; ``--chat-template`` takes a built-in name
  or a Jinja file for base models without one (``templates.py``). The plugin sets it on the
  tokenizer in ``sftctl_prepare_tokenizer`` (adding the template's marker tokens as special
  tokens when the vocabulary lacks them), so the checkpoint's tokenizer config carries the
  template that trained it: transformers, vLLM and a later DPO run format prompts the same way.
- Masks are derived by rendering conversation prefixes (``masks.py``), exact for any template
  without ``{% generation %}`` markers; a template that cannot give an exact mask for a record is
  a record error naming the template and turn, never a silent all-zero or all-one mask.
- The format is token-level (``to_tokens``): the template writes BOS and end markers itself,
  so the pipeline adds nothing.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from sftctl import ConfigError, ConfigOption, DatasetFormat, RecordError, hookimpl

from .conversation import LAYOUTS, Layout, parse_role_map, to_conversation
from .masks import TemplateError, render_with_mask
from .templates import MARKERS, TEMPLATES, resolve_template

log = logging.getLogger("sftctl")

FORMAT = "chat"
HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "default_config.yaml"  # tuned defaults of the embedded chat run


def _layout(record: Mapping[str, Any], options: Mapping[str, Any]) -> Layout:
    name = options.get("chat.layout") or "auto"
    if name == "auto":
        if "prompt" in record and "completion" in record:
            name = "prompt_completion"
        elif options.get("chat.messages_field") and options["chat.messages_field"] in record:
            name = "messages"
        elif "conversations" in record:
            name = "sharegpt"
        elif "messages" in record:
            name = "messages"
        else:
            raise RecordError("messages", "no conversation found: expected a 'messages' list "
                                          "(OpenAI), a 'conversations' list (ShareGPT) or "
                                          "'prompt' and 'completion' lists (see --chat-layout)")
    base = LAYOUTS[name]
    return Layout(base.name,
                  options.get("chat.messages_field") or base.messages_field
                  if base.messages_field else None,
                  options.get("chat.role_field") or base.role_field,
                  options.get("chat.content_field") or base.content_field)


def parse_record(record: Mapping[str, Any], options: Mapping[str, Any],
                 for_training: bool = True) -> list[dict]:
    try:
        role_map = parse_role_map(options.get("chat.role_map"))
    except ValueError as e:
        raise RecordError(None, str(e)) from None
    return to_conversation(record, _layout(record, options), role_map=role_map,
                           train_on=options.get("chat.train_on") or "all",
                           for_training=for_training)


def validate(record, options) -> None:
    parse_record(record, options)


def template_kwargs(options: Mapping[str, Any]) -> dict:
    kw = {}
    if options.get("chat.enable_thinking") is not None:
        kw["enable_thinking"] = options["chat.enable_thinking"]
    return kw


def to_tokens(record, tokenizer, options) -> tuple[list[int], list[int]]:
    msgs = parse_record(record, options)
    try:
        r = render_with_mask(tokenizer, msgs, template=None,  # the tokenizer's (set by the plugin)
                             template_name=_template_label(tokenizer, options),
                             template_kwargs=template_kwargs(options))
    except TemplateError as e:
        field = f"turn {e.turn}" if e.turn is not None else None
        raise RecordError(field, e.message) from None
    return r.ids, r.mask


def to_pair(record, options) -> tuple[list[dict], str]:
    """(the conversation minus its last assistant answer, that answer): the prompt/reference
    pair of the benchmark of the user's data (``sftctl.evals.user_tasks``); the prompt is
    rendered by the evaluated model's chat template."""
    msgs = parse_record(record, options, for_training=False)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None or not isinstance(msgs[last].get("content"), str) or \
            not msgs[last]["content"].strip():
        raise RecordError(None, "no assistant answer with text to benchmark")
    return [m for m in msgs[:last]], msgs[last]["content"]


def _template_label(tokenizer, options) -> str:
    spec = options.get("chat.template")
    return f"chat template {spec!r}" if spec else "the tokenizer's chat template"


@functools.lru_cache(maxsize=4)
def _splits(seed: int, n_train: int | None, n_heldout: int | None):
    from .demo_data import default_splits

    return default_splits(seed=seed, n_train=n_train, n_heldout=n_heldout)


def _demo_splits(config):
    return _splits(config.option("chat.demo_seed"), config.option("chat.demo_train_size"),
                   config.option("chat.demo_heldout_size"))


def demo_records(config) -> dict:
    train, heldout = _demo_splits(config)
    return {"train": train, "validation": heldout}


def demo_base(out_dir, seed: int = 0) -> None:
    """The embedded base: a tiny Llama whose tokenizer carries the ChatML template."""
    from .demo_model import build_default_base

    build_default_base(out_dir, seed=seed)


def read_heldout(path: str, options: Mapping[str, Any]) -> list[list[dict]]:
    """Held-out conversations from a JSONL file (any layout the format reads); errors name the
    file, the line and the field."""
    convs = []
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"chat.heldout: {p} not found")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                convs.append(parse_record(json.loads(line), options))
            except (json.JSONDecodeError, RecordError) as e:
                raise ConfigError(f"chat.heldout: {p}: line {lineno}: {e}") from None
    if not convs:
        raise ConfigError(f"chat.heldout: {p} holds no conversation")
    return convs


@hookimpl
def sftctl_add_options(register):
    register(ConfigOption("chat.template", str, None,
                          "Chat template: a built-in name (" + ", ".join(sorted(TEMPLATES)) +
                          ") or a Jinja file (default: the tokenizer's own). Saved with the "
                          "checkpoint's tokenizer."))
    register(ConfigOption("chat.layout", str, "auto",
                          "Record layout: messages (OpenAI), sharegpt (conversations/from/value), "
                          "prompt_completion, or auto (from each record's keys).",
                          choices=("auto", "messages", "sharegpt", "prompt_completion")))
    register(ConfigOption("chat.messages_field", str, None,
                          "Field holding the message list (default: messages, or conversations "
                          "for sharegpt)."))
    register(ConfigOption("chat.role_field", str, None,
                          "Field of a message holding its role (default: role, or from)."))
    register(ConfigOption("chat.content_field", str, None,
                          "Field of a message holding its text (default: content, or value)."))
    register(ConfigOption("chat.role_map", str, None,
                          "Extra role names, e.g. 'human=user,bot=assistant' (roles: system, user, "
                          "assistant, tool)."))
    register(ConfigOption("chat.train_on", str, "all",
                          "Which assistant turns train: all, or only the last.",
                          choices=("all", "last")))
    register(ConfigOption("chat.enable_thinking", bool, None,
                          "Passed to the template as enable_thinking (Qwen3-style templates)."))
    register(ConfigOption("chat.heldout", str, None,
                          "JSONL file of held-out conversations to benchmark after training "
                          "when --data is given (the last answer of each, exact match)."))
    register(ConfigOption("chat.demo_seed", int, 0, "Seed of the chat demo data generator."))
    register(ConfigOption("chat.demo_train_size", int, None,
                          "Training conversations of the chat demo data (default: the "
                          "generator's)."))
    register(ConfigOption("chat.demo_heldout_size", int, None,
                          "Held-out conversations of the chat demo data (default: the "
                          "generator's)."))


@hookimpl
def sftctl_register_dataset_formats(register):
    register(DatasetFormat(
        name=FORMAT,
        to_tokens=to_tokens,
        validate=validate,
        to_pair=to_pair,
        uses_options=True,
        fields={"messages": "OpenAI layout: list of {role, content[, tool_calls, "
                            "reasoning_content, train, weight]}",
                "conversations": "ShareGPT layout: list of {from, value}",
                "prompt": "prompt/completion layout: messages before the answer",
                "completion": "prompt/completion layout: the assistant message(s) to learn"},
        description="Conversations rendered with the model's chat template (or --chat-template); "
                    "every assistant turn and its end-of-turn marker trained, nothing else",
        demo_data=demo_records,
        demo_config=str(DEFAULT_CONFIG),
        demo_base=demo_base,
    ))


@hookimpl
def sftctl_register_benchmarks(register, config):
    if config.data.format != FORMAT or config.train.output_dir is None:
        return
    from .tasks import chat_benchmarks

    options = dict(config.options)
    heldout = config.option("chat.heldout")
    if heldout is not None:
        convs, source = read_heldout(heldout, options), f"conversations of {heldout}"
    elif config.data.paths:
        log.info("chat: no benchmark for --data runs unless the option chat.heldout names a "
                 "held-out JSONL file")
        return
    else:
        _, records = _demo_splits(config)
        convs = [parse_record(r, options) for r in records]
        source = "held-out demo conversations"
    template = None
    if config.option("chat.template"):
        template = resolve_template(config.option("chat.template"))[1]
    eval_dir = Path(config.train.output_dir) / "eval" / "tasks"
    for spec in chat_benchmarks(convs, eval_dir, chat_template=template,
                                limit=config.eval.limit, source=source):
        register(spec)


@hookimpl
def sftctl_prepare_tokenizer(tokenizer, config):
    """Put the run's chat template on the tokenizer (and its marker tokens in the vocabulary)."""
    if config.data.format != FORMAT:
        return
    spec = config.option("chat.template")
    if spec is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat.template: the tokenizer has no chat template; pass "
                              "--chat-template NAME (" + ", ".join(sorted(TEMPLATES)) +
                              ") or --chat-template FILE.jinja")
        return
    try:
        name, source = resolve_template(spec)
    except FileNotFoundError as e:
        raise ConfigError(f"chat.template: {e}") from None
    missing = [m for m in MARKERS.get(name, []) if tokenizer.convert_tokens_to_ids(m) in
               (None, tokenizer.unk_token_id)]
    if missing:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in missing],
                             special_tokens=True)
        log.info("chat: added the %s template's marker tokens to the tokenizer: %s", name,
                 ", ".join(missing))
    tokenizer.chat_template = source
