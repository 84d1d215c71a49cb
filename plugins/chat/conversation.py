"""Records -> one normalized conversation: a list of messages, each with a ``trainable`` flag.

Design choices
- Three layouts, one result: OpenAI ``messages`` (``role``/``content``, assistant
  ``tool_calls``, ``tool`` results), ShareGPT ``conversations`` (``from``/``value`` with the
  usual role names) and conversational prompt/completion (``prompt`` and ``completion`` as
  message lists; only the completion trains). Field and role names can be remapped by options
  for data whose keys differ.
- Keys whose value is null count as absent: Arrow (JSONL, Parquet and saved datasets load
  through it) gives every message of a file the union of the keys its messages use.
- Strict: an unknown role, a missing/empty/non-string content (an assistant message with tool
  calls may have none), a bad ``train``/``weight`` value or a training conversation that does
  not end with an assistant turn raise ``RecordError`` naming the turn and field
  (``messages[3].content``); the data pipeline adds the file and record.
- Which assistant turns train: all (default) or only the last (``chat.train_on``), and a
  message's own ``train: false`` or ``weight: 0`` opts it out (``weight`` must be 0 or 1: the
  loss has no per-token weights, so a fractional weight is refused rather than rounded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sftctl import RecordError

ROLES = ("system", "user", "assistant", "tool")

# ShareGPT and other common spellings of the four roles
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
    "function_response": "tool",
}


@dataclass(frozen=True)
class Layout:
    """Where a record keeps its messages and how a message names its role and content."""

    name: str
    messages_field: str | None   # None: prompt/completion layout
    role_field: str
    content_field: str


LAYOUTS = {
    "messages": Layout("messages", "messages", "role", "content"),
    "sharegpt": Layout("sharegpt", "conversations", "from", "value"),
    "prompt_completion": Layout("prompt_completion", None, "role", "content"),
}


def parse_role_map(text: str | None) -> dict[str, str]:
    """``"human=user,gpt=assistant"`` -> mapping onto the four roles (an option's value)."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        src, sep, dst = item.partition("=")
        if not sep or dst.strip() not in ROLES:
            raise ValueError(f"chat.role_map: {item!r} is not NAME=ROLE with ROLE one of "
                             f"{', '.join(ROLES)}")
        out[src.strip()] = dst.strip()
    return out


def _trainable_flag(msg: Mapping[str, Any], where: str) -> bool:
    # Arrow gives every message of a file the union of the keys: an absent key reads as None
    train = msg.get("train")
    train = True if train is None else train
    if not isinstance(train, bool):
        raise RecordError(f"{where}.train", f"expected true or false, got {train!r:.40}")
    if "weight" in msg and msg["weight"] is not None:
        w = msg["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
            raise RecordError(f"{where}.weight", f"expected 0 or 1 (the loss has no per-token "
                                                 f"weights), got {w!r:.40}")
        train = train and w == 1
    return train


def _message(msg: Any, where: str, layout: Layout, role_map: Mapping[str, str]) -> dict:
    if not isinstance(msg, Mapping):
        raise RecordError(where, f"expected a message object, got {type(msg).__name__}")
    raw_role = msg.get(layout.role_field)
    if not isinstance(raw_role, str):
        raise RecordError(f"{where}.{layout.role_field}", "missing role" if raw_role is None
                          else f"expected a string, got {type(raw_role).__name__}")
    role = role_map.get(raw_role) or ROLE_ALIASES.get(raw_role.lower())
    if role is None:
        raise RecordError(f"{where}.{layout.role_field}",
                          f"unknown role {raw_role!r} (known: {', '.join(sorted(ROLE_ALIASES))}"
                          "; map others with --chat-role-map NAME=ROLE)")
    out: dict[str, Any] = {"role": role}
    content = msg.get(layout.content_field)
    tool_calls = msg.get("tool_calls") if role == "assistant" else None
    if tool_calls is not None:
        if not isinstance(tool_calls, list) or not tool_calls:
            raise RecordError(f"{where}.tool_calls", "expected a non-empty list of calls")
        for j, call in enumerate(tool_calls):
            fn = call.get("function", call) if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise RecordError(f"{where}.tool_calls[{j}]", "expected a call with a function "
                                                              "name")
        out["tool_calls"] = tool_calls
    if content is None and tool_calls is not None:
        content = ""
    elif content is None:
        raise RecordError(f"{where}.{layout.content_field}", "missing")
    elif not isinstance(content, str):
        raise RecordError(f"{where}.{layout.content_field}",
                          f"expected a string, got {type(content).__name__} {content!r:.60}")
    elif not content.strip() and tool_calls is None:
        raise RecordError(f"{where}.{layout.content_field}", "empty text")
    out["content"] = content
    reasoning = msg.get("reasoning_content")
    if reasoning is not None and role == "assistant":
        if not isinstance(reasoning, str):
            raise RecordError(f"{where}.reasoning_content", "expected a string")
        out["reasoning_content"] = reasoning
    out["trainable"] = role == "assistant" and _trainable_flag(msg, where)
    return out


def _message_list(value: Any, field: str, layout: Layout, role_map) -> list[dict]:
    if value is None:
        raise RecordError(field, "missing")
    if not isinstance(value, list) or not value:
        raise RecordError(field, "expected a non-empty list of messages")
    return [_message(m, f"{field}[{i}]", layout, role_map) for i, m in enumerate(value)]


def to_conversation(record: Mapping[str, Any], layout: Layout, *, role_map=None,
                    train_on: str = "all", for_training: bool = True) -> list[dict]:
    """The record's messages (``role``, ``content``, ``tool_calls``, ``reasoning_content``,
    ``trainable``), validated (see the module docstring)."""
    role_map = role_map or {}
    if layout.messages_field is None:  # prompt/completion: both are message lists
        prompt = _message_list(record.get("prompt"), "prompt", layout, role_map)
        completion = _message_list(record.get("completion"), "completion", layout, role_map)
        for m in prompt:
            m["trainable"] = False
        msgs = prompt + completion
        field = "completion"
    else:
        field = layout.messages_field
        msgs = _message_list(record.get(field), field, layout, role_map)
    if for_training:
        if msgs[-1]["role"] != "assistant":
            raise RecordError(f"{field}[{len(msgs) - 1 if field != 'completion' else ''}]"
                              .replace("[]", ""),
                              f"the conversation ends with a {msgs[-1]['role']} turn; a training "
                              "conversation must end with an assistant turn")
        if train_on == "last":
            for m in msgs[:-1]:
                m["trainable"] = False
        if not any(m["trainable"] for m in msgs):
            raise RecordError(field, "no assistant turn is trained (all have train: false or "
                                     "weight: 0)")
    return msgs
