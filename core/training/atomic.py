"""Atomic writes: directories that appear complete or not at all, fsynced files, the final Hugging
Face model directory.

Design choices
- A checkpoint directory appears under its final name only when complete: everything is written
  into a hidden temporary sibling (same filesystem), files and the directory are fsynced, then
  the directory is renamed into place. An existing directory of that name is moved aside first
  and deleted only after the new one is in place, so a crash never leaves a half-written
  directory under the final name (and at worst leaves the old one under ``.NAME.old-PID``).
- The model directory is a standard HF checkpoint (``save_pretrained`` with safetensors, the
  tokenizer, the generation config) plus ``sftctl_config.yaml`` (the resolved run config) and
  ``sftctl_summary.json``, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads it and the run
  that produced it is documented inside it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator



def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block exits without error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def nonfinite_kind(x) -> str | None:
    """"nan", "inf" or "-inf" for a non-finite float, else None."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return None


def strict_json(obj, *, flag_lists: bool = False):
    """``obj`` with each non-finite float replaced by None (NaN/Infinity are not JSON); in a dict
    the key also gets a sibling ``<key>_nonfinite`` flag ("nan", "inf", "-inf").
    ``flag_lists``: a list value's key gets the kind of its first non-finite element too."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            kind = nonfinite_kind(v)
            if kind is None and flag_lists and isinstance(v, (list, tuple)):
                kind = next((c for c in map(nonfinite_kind, v) if c), None)
            out[k] = strict_json(v, flag_lists=flag_lists)
            if kind is not None:
                out[f"{k}_nonfinite"] = kind
        return out
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, flag_lists=flag_lists) for v in obj]
    return None if nonfinite_kind(obj) else obj


def write_json(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)  # a full disk: no half file left next to the result
        raise


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # a kill leaves it too: the next run's start removes it (sftctl.run.rundir)


def save_hf_model(model, tokenizer, path: Path, *, config_yaml: str, summary: dict,
                  state_dict: dict | None = None) -> None:
    """Write a standard HF model directory (call inside ``atomic_directory``); ``state_dict``:
    full weights gathered from shards (FSDP) instead of the model's own."""
    from .guards import disk_full_point  # test faults: a real full disk before each write

    path = Path(path)
    disk_full_point("model_weights", path)
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    disk_full_point("model_tokenizer", path)
    tokenizer.save_pretrained(path)
    gen = getattr(model, "generation_config", None)
    if gen is not None and not (path / "generation_config.json").exists():
        gen.save_pretrained(path)
    disk_full_point("model_files", path)
    write_text(path / "sftctl_config.yaml", config_yaml)
    write_json(path / "sftctl_summary.json", summary)


def checkpoint_complete(model_dir: Path) -> bool:
    """The final model directory holds what a complete run writes."""
    model_dir = Path(model_dir)
    weights = (model_dir / "model.safetensors").is_file() or \
        (model_dir / "model.safetensors.index.json").is_file()
    return weights and all((model_dir / f).is_file() for f in
                           ("config.json", "sftctl_config.yaml", "sftctl_summary.json"))


def config_yaml(config) -> str:
    """The resolved run config as YAML text (saved next to every checkpoint)."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
