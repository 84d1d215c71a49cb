"""``sftctl data preview``: the first examples exactly as training encodes them, trained tokens
highlighted, for any dataset format.

Design choices
- Same path as training: the run config is resolved from the same flags, the tokenizer goes
  through the plugins' ``sftctl_prepare_tokenizer`` (a chat template is set there) and records
  go through ``sftctl.data.prepare_data`` with ``--max-examples N``; nothing is re-implemented,
  so what is shown is what would train.
- On a terminal trained tokens are shown in colour; otherwise (a pipe, a file, NO_COLOR) they
  are wrapped in ``[[ ]]`` so the boundary is still visible. ``--json`` prints one object per
  example: ids, token strings, the mask and the decoded text.
- With no ``--model``, the format's embedded demo base is built in a temporary directory.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

GREEN, RESET = "\x1b[1;30;42m", "\x1b[0m"


def _segments(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, bool]]:
    """Runs of equally-masked tokens decoded together (so multi-byte characters stay whole)."""
    out: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((tokenizer.decode(ids[start:i]), bool(mask[start])))
            start = i
    return out


def render_example(tokenizer, ids: list[int], mask: list[int], color: bool) -> str:
    parts = []
    for text, trained in _segments(tokenizer, ids, mask):
        if not trained:
            parts.append(text)
        elif color:
            parts.append(GREEN + text + RESET)
        else:
            parts.append("[[" + text + "]]")
    return "".join(parts)


def preview(cfg, pm, n: int, as_json: bool, out=sys.stdout) -> int:
    from ..training.model import load_tokenizer, model_source
    from ..training.distributed import select_strategy
    from ..training.trainer import prepare_run_data

    formats = pm.dataset_formats()
    fmt = formats[cfg.data.format]
    cfg.data.max_examples = n
    cfg.data.val_paths, cfg.data.val_split, cfg.data.val_fraction = [], None, 0.0
    cfg.train.quiet = True
    with tempfile.TemporaryDirectory(prefix="sftctl-preview-") as tmp:
        src, _ = model_source(cfg.model.name_or_path, fmt, Path(tmp), select_strategy(cfg))
        tok = load_tokenizer(cfg.model.tokenizer or src, cfg.model)
        pm.hook.sftctl_prepare_tokenizer(tokenizer=tok, config=cfg)
        data = prepare_run_data(cfg, fmt, tok, pm)
    split = data.train
    rows = split.rows(range(min(n, len(split))))
    color = not as_json and out.isatty() and not os.environ.get("NO_COLOR")
    for i, (ids, mask) in enumerate(rows):
        if as_json:
            print(json.dumps({"example": i, "input_ids": ids,
                              "tokens": tok.convert_ids_to_tokens(ids), "loss_mask": mask,
                              "text": tok.decode(ids)}, ensure_ascii=False), file=out)
            continue
        trained = sum(mask)
        print(f"--- example {i}: {len(ids)} tokens, {trained} trained"
              + ("" if color else " (trained text in [[ ]])"), file=out)
        print(render_example(tok, ids, mask, color), file=out)
    if not as_json:
        s = split.stats
        print(f"--- format {fmt.name!r} (plugin {fmt.plugin}); of the first {s.records} records: "
              f"{s.used} used, {s.truncated} truncated, {s.dropped} dropped, {s.skipped} skipped",
              file=out)
    return 0
