"""Built-in chat templates (Jinja) for base models that have none: ``--chat-template NAME``.

Design choices
- Each template reproduces the rendering of the model family it is named after (its role
  markers, end-of-turn tokens, generation prompt, and quirks such as Gemma folding the system
  prompt into the first user turn or Qwen3 dropping the reasoning of turns before the last user
  message), so that a model trained with one of them talks the same format as the family's
  instruct models. They are written for sftctl, not copied.
- A template only formats; it never decides what is trained. Masks come from rendering
  conversation prefixes (``masks.py``), so these templates carry no ``{% generation %}`` markers.
- Each name lists the special tokens its markers need (``MARKERS``): a base model's tokenizer
  that lacks them gets them added as special tokens (and the embedding resized), so every
  marker is one token and the end-of-turn marker can be trained.
- Tool calls: assistant ``tool_calls`` are rendered as JSON in the family's way; ``tool``
  messages as the family's tool-result turn.
"""

from __future__ import annotations

from pathlib import Path

# Every template gets `messages`, `add_generation_prompt`, `bos_token`, `eos_token` (and
# `tools`, `enable_thinking` where the family has them) from `apply_chat_template`.

_TOOL_CALLS_JSON = (
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{{- '\n' if not loop.first else '' -}}"
    "{{- '{\"name\": \"' + fn.name + '\", \"arguments\": ' + (fn.arguments if fn.arguments is "
    "string else fn.arguments | tojson) + '}' -}}"
    "{%- endfor -%}"
)
# Literal text is written as {{ '...' }} expressions: Jinja's {%- / -%} whitespace control would
# otherwise eat the newlines that belong to the format.

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\n' -}}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    "{{- (message.content or '') + '<tool_call>\n' -}}" + _TOOL_CALLS_JSON +
    "{{- '\n</tool_call>' -}}"
    "{%- else -%}{{- message.content -}}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Qwen2.5: ChatML with a default system prompt, tool results as user turns.
QWEN25 = (
    "{%- if not messages or messages[0].role != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'tool' -%}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + "
    "'\n</tool_response><|im_end|>\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\n' -}}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    "{{- (message.content or '') + '<tool_call>\n' -}}" + _TOOL_CALLS_JSON +
    "{{- '\n</tool_call>' -}}"
    "{%- else -%}{{- message.content -}}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Qwen3: ChatML; an assistant turn after the last user message carries its reasoning in a
# <think> block (an empty one for the final turn when it has none); reasoning of earlier turns is
# dropped. The generation prompt adds an empty think block when thinking is switched off.
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set content = message.content or '' -%}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is defined "
    "and message.reasoning_content is not none else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}"
    "{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' -}}"
    "{%- endif -%}"
    "{{- content -}}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    "{{- '<tool_call>\n' -}}" + _TOOL_CALLS_JSON + "{{- '\n</tool_call>' -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + "
    "'\n</tool_response><|im_end|>\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Llama 3.x: header blocks, <|eot_id|> ends each turn, tool results under the ipython role.
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message.role == 'tool' else message.role -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' -}}"
    "{%- if message.tool_calls is defined and message.tool_calls -%}"
    + _TOOL_CALLS_JSON +
    "{%- else -%}{{- message.content | trim -}}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

# Gemma 2/3: user/model turns that must alternate; the system prompt opens the first user turn.
GEMMA = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='', first=0) -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set ns.system = messages[0].content | trim + '\n\n' -%}{%- set ns.first = 1 -%}"
    "{%- endif -%}"
    "{%- for message in messages[ns.first:] -%}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\n' -}}"
    "{{- (ns.system if loop.first else '') + (message.content | trim) + '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

# Mistral v0.3 (v3 tokenizer): [INST] blocks, the system prompt before the last user message,
# an assistant answer ends with </s>; no generation prompt beyond [/INST].
MISTRAL = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='', last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}{%- set ns.system = message.content -%}"
    "{%- elif message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{- '[INST] ' + (ns.system + '\n\n' if ns.system and loop.index0 == ns.last_user else '') "
    "+ message.content + '[/INST]' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- ' ' + (message.content | trim) + eos_token -}}"
    "{%- elif message.role == 'tool' -%}"
    "{{- '[TOOL_RESULTS] ' + message.content + '[/TOOL_RESULTS]' -}}"
    "{%- elif message.role != 'system' -%}"
    "{{- raise_exception('Only user, assistant, system and tool roles are supported') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Phi-3: <|role|> markers, <|end|> ends each turn.
PHI3 = (
    "{%- for message in messages -%}"
    "{{- '<|' + message.role + '|>\n' + message.content + '<|end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

TEMPLATES = {"chatml": CHATML, "qwen2.5": QWEN25, "qwen3": QWEN3, "llama3": LLAMA3,
             "gemma": GEMMA, "mistral": MISTRAL, "phi3": PHI3}

# special tokens a template's markers need (a tokenizer without them gets them added)
MARKERS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "qwen2.5": ["<|im_start|>", "<|im_end|>"],
    "qwen3": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "gemma": ["<bos>", "<start_of_turn>", "<end_of_turn>"],
    "mistral": ["[INST]", "[/INST]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
    "phi3": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}


def resolve_template(spec: str) -> tuple[str, str]:
    """(name, Jinja source) of ``--chat-template``: a built-in name or a Jinja file path."""
    if spec in TEMPLATES:
        return spec, TEMPLATES[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path), path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"--chat-template {spec!r}: neither a built-in template "
                            f"({', '.join(sorted(TEMPLATES))}) nor a Jinja file")
