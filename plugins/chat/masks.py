"""Exact assistant-only masks for any chat template, without ``{% generation %}`` markers.

How the trained span of an assistant turn ``i`` is found (tokens of the rendered text,
``add_special_tokens=False``: the template writes its own BOS):

1. ``F``: the whole conversation rendered; ``P``: the messages before turn ``i`` rendered with
   the generation prompt. ``P`` must be a token prefix of ``F`` (the history the model sees when
   it answers is the history it is trained on); otherwise the template is refused for this
   record and turn.
2. The span starts right after ``P``: everything the model writes for that turn (a think block
   the template adds, the content, tool calls).
3. It ends with the turn's end-of-turn marker: the first end token (EOS or another special
   token of the tokenizer) after which the decoded span contains the whole message content. So
   ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>`` are trained (the model must learn
   to stop) and what the template writes after them (a newline, the next header) is not.
4. When the conversation up to turn ``i`` is itself a token prefix of ``F`` the end must lie
   inside that rendering; when it is not (Qwen3 drops the reasoning of earlier turns) the turn
   is located in ``F`` by steps 2-3 alone, which is exactly how ``F`` renders it.

Any failure is a ``TemplateError`` naming the template, the turn and what did not match; the
data pipeline turns it into a record error (file, record), never a silent all-zero or all-one
mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


class TemplateError(ValueError):
    """The template cannot give an exact mask for this conversation (see the module doc)."""

    def __init__(self, turn: int | None, message: str):
        super().__init__(message)
        self.turn = turn
        self.message = message


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    mask: list[int]          # 1: trained (assistant content and its end marker)
    spans: list[tuple[int, int]]  # [start, end) of each trained turn


def _for_template(msgs: Sequence[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "trainable"} for m in msgs]


def render_ids(tokenizer, messages: Sequence[dict], *, template: str | None,
               add_generation_prompt: bool, template_kwargs: dict | None = None) -> list[int]:
    text = tokenizer.apply_chat_template(
        _for_template(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
        chat_template=template, **(template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_token_ids(tokenizer) -> set[int]:
    """Candidates for an end-of-turn marker: EOS and every special token of the tokenizer."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for tok_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tok_id))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    pad, bos = tokenizer.pad_token_id, tokenizer.bos_token_id
    return {i for i in ids if i not in (pad, bos) or i == tokenizer.eos_token_id}


def _content_text(msg: dict) -> str:
    # a reasoning block written inline (Qwen3 style) is re-rendered by the template: the answer
    # after it is what must appear verbatim
    return (msg.get("content") or "").split("</think>")[-1].strip()


def render_with_mask(tokenizer, messages: Sequence[dict], *, template: str | None,
                     template_name: str = "the tokenizer's chat template",
                     template_kwargs: dict | None = None,
                     end_ids: set[int] | None = None) -> Rendered:
    """Token ids of the whole conversation and the mask of its trainable assistant turns."""
    end_ids = end_token_ids(tokenizer) if end_ids is None else end_ids

    def render(msgs, gen):
        try:
            return render_ids(tokenizer, msgs, template=template, add_generation_prompt=gen,
                              template_kwargs=template_kwargs)
        except Exception as e:  # jinja2 errors, raise_exception() of the template
            raise TemplateError(len(msgs) - 1 if msgs else None,
                                f"{template_name} cannot render this conversation: "
                                f"{type(e).__name__}: {e}") from None

    full = render(messages, False)
    mask = [0] * len(full)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or not msg.get("trainable"):
            continue
        before = render(messages[:i], True)
        if full[:len(before)] != before:
            raise TemplateError(i, f"{template_name}: the conversation before turn {i} rendered "
                                   "with the generation prompt is not a token prefix of the "
                                   "whole conversation (the template changes the history or "
                                   "its generation prompt differs from its assistant header)")
        through = render(messages[:i + 1], False)
        limit = len(through) if full[:len(through)] == through else len(full)
        start = len(before)
        content = _content_text(msg)
        end = None
        for j in range(start, limit):
            if full[j] in end_ids and (not content or
                                       content in tokenizer.decode(full[start:j])):
                end = j + 1
                break
        if end is None:
            raise TemplateError(i, f"{template_name}: turn {i} has no end-of-turn token (EOS or "
                                   "a special token) after its content")
        if end <= start:
            raise TemplateError(i, f"{template_name}: turn {i} renders no tokens")
        for j in range(start, end):
            mask[j] = 1
        spans.append((start, end))
    if not spans:
        raise TemplateError(None, "no assistant turn is trained")
    return Rendered(full, mask, spans)


def check_decodes(tokenizer, rendered: Rendered, messages: Sequence[dict[str, Any]]) -> None:
    """Each trained span decodes to text that holds its message's content (a cheap guard that
    the span is the right one; the tests check the exact text)."""
    turns = [m for m in messages if m["role"] == "assistant" and m.get("trainable")]
    for (s, e), m in zip(rendered.spans, turns):
        text = tokenizer.decode(rendered.ids[s:e])
        if _content_text(m) and _content_text(m) not in text:
            raise TemplateError(None, f"trained span {s}:{e} decodes to {text!r:.80}, which does "
                                      "not hold the assistant content")
