"""sftctl-sharegpt: the ShareGPT conversation format as an sftctl plugin (an example to copy).

Design choices
- Only the public plugin API is used (``from sftctl import hookimpl, DatasetFormat, ...``);
  pluggy is never imported here.
- A conversation becomes alternating segments: role headers and user/system turns are prompt
  (no loss), every assistant turn is trained. The data pipeline appends EOS after the last turn.
- Settings come from the run's plugin options, passed to ``to_segments`` (``uses_options=True``),
  never from module globals: tokenization workers and the datasets cache see them.
- Records are checked strictly and errors name the field path (``conversations[2].value``), so
  the user sees the file, the record and the exact place.
- Demo data (used with ``--plugin sharegpt`` and no ``--data``): two-turn conversations built
  from sftctl's own deterministic demo tasks, so the plugin trains end to end offline.
"""

from __future__ import annotations

from sftctl import ConfigError, ConfigOption, DatasetFormat, RecordError, Segment, hookimpl

__version__ = "0.1.0"

ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
         "assistant": "assistant"}
HEADER = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def to_segments(record, options) -> list[Segment]:
    system = options.get("sharegpt.system")
    conv = record.get("conversations")
    if conv is None:
        raise RecordError("conversations", "missing")
    if not isinstance(conv, list) or not conv:
        raise RecordError("conversations", "expected a non-empty list of turns")
    segs: list[Segment] = []
    prompt = ""
    roles = []
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object, got {type(turn).__name__}")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise RecordError(f"{where}.from", f"expected one of {sorted(ROLES)}, got "
                                               f"{turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise RecordError(f"{where}.value", f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise RecordError(f"{where}.value", "empty turn")
        if role == "system" and i != 0:
            raise RecordError(f"{where}.from", "a system turn may only come first")
        roles.append(role)
        if role == "assistant":
            prompt += HEADER["assistant"]
            segs.append(Segment(prompt, False))
            segs.append(Segment(value, True))
            prompt = "\n\n"
        else:
            if i == 0 and role != "system" and system:
                prompt += HEADER["system"] + system + "\n\n"
            prompt += HEADER[role] + value + "\n\n"
    if "assistant" not in roles:
        raise RecordError("conversations", "no assistant ('gpt') turn to learn from")
    if roles[-1] != "assistant":
        raise RecordError(f"conversations[{len(conv) - 1}].from",
                          "the conversation must end with an assistant ('gpt') turn")
    return segs


def demo_data(config) -> dict:
    from sftctl.plugins.alpaca.demo_data import generate

    def chats(records):
        out = []
        for a, b in zip(records[::2], records[1::2]):
            turns = []
            for r in (a, b):
                ask = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
                turns += [{"from": "human", "value": ask}, {"from": "gpt", "value": r["output"]}]
            out.append({"conversations": turns})
        return out

    n = config.option("sharegpt.demo_size")
    return {"train": chats(generate(2 * n, seed=101)),
            "validation": chats(generate(64, seed=202))}


@hookimpl
def sftctl_add_options(register):
    register(ConfigOption("sharegpt.system", str, None,
                          "System prompt added to conversations that have none."))
    register(ConfigOption("sharegpt.demo_size", int, 2000,
                          "Conversations in the plugin's demo data."))


@hookimpl
def sftctl_configure(config):
    system = config.option("sharegpt.system")
    if system is not None and not system.strip():
        raise ConfigError("options.sharegpt.system: the system prompt is empty")
    if config.option("sharegpt.demo_size") < 2:
        raise ConfigError("options.sharegpt.demo_size: needs at least 2 conversations")


@hookimpl
def sftctl_register_dataset_formats(register):
    register(DatasetFormat(
        name="sharegpt",
        to_segments=to_segments,
        fields={"conversations": "list of {from: system|human|gpt, value: text} turns"},
        required=("conversations",),
        description="ShareGPT multi-turn conversations; every gpt turn is trained",
        demo_data=demo_data,
        uses_options=True,
    ))
