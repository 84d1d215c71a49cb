"""Resumable checkpoints: periodic atomic saves, rotation, ``--resume``, preemption saves.

Layout of one checkpoint, ``OUTPUT_DIR/checkpoints/step-00000012/``::

    model.safetensors    the weights (safetensors; a tensor shared by several names, such as
                         tied embeddings, is stored once and the aliases are in the metadata)
    trainer_state.pt     optimizer, scheduler, grad scaler, TrainState (step, epoch, position in
                         the epoch, token counters, metrics history, non-finite counters), every
                         RNG of rank 0, world size; tensors and plain types only, read back with
                         ``torch.load(weights_only=True)``
    rng-rank{R}.pt       the RNG states of rank R > 0 (multi-process runs)
    sharded/             FSDP only: model + optimizer shards (torch.distributed.checkpoint), in
                         place of model.safetensors and the optimizer entry of trainer_state.pt
    sftctl_config.yaml   the run's resolved config
    COMPLETE             JSON written last: step, reason, each file's size and content hash
                         (BLAKE2b-128, verified on resume), data fingerprint

Design choices
- Atomic: everything is written into ``.step-N.tmp`` next to the final name, fsynced (files and
  directory), renamed, the parent directory fsynced, and only then ``COMPLETE`` is written
  (itself through a temporary file and a rename, then fsynced). A directory without the marker,
  or whose files do not have the sizes the marker lists, is never resumed from. Older
  checkpoints are removed (``--keep-last``) only after the new marker is on disk.
- A failed save (no space, read-only, permission, quota) removes its temporary directory, keeps
  every earlier checkpoint, and ends the run with a ``TrainingError`` that names the path, the
  OS error and the checkpoint that is still good.
- ``--resume latest`` takes the newest complete checkpoint of the output directory (skipping,
  with a warning, incomplete or damaged ones); with none it starts a new run and says so, so one
  command line serves the first launch and every restart of a preemptible job. ``--resume PATH``
  takes that checkpoint (or the newest one of the run directory PATH) and fails if it is not
  complete. The resumed run must be the same run: the config keys that change the trajectory and
  a fingerprint of the tokenized training data are compared, and differences are an error.
- Exactness: the data order is a function of (seed, epoch) and the position inside the epoch is
  in ``TrainState``; with the weights, optimizer, scheduler, scaler and RNG states restored bit
  for bit, the resumed run repeats the uninterrupted run's steps exactly (on the CPU; on GPUs up
  to the nondeterminism of their kernels).
- The checkpointer gets the parts it saves, not the trainer: the ``RunState`` bundle (one
  ``state_dict``/``load_state_dict`` for model, optimizer, scheduler, scaler, RNGs and counters),
  the strategy, its settings, the config text and the data fingerprint. ``before_save`` lets the
  non-finite guard veto a save past an unread bad step; ``after_save(step, path)`` runs after
  each complete periodic save (the trainer calls ``sftctl_checkpoint_saved`` from it).
- Plugins: ``sftctl_save`` stays the hook of the final model only (its documented meaning);
  plugin state kept in ``run.extras`` is not part of a resumable checkpoint.
- Multi-process runs: every rank takes part (the state dict may be collective); rank 0 writes,
  each other rank adds its RNG file to the temporary directory, and the ranks agree on success
  through one all-reduce before the rename (the temporary name is deterministic for that
  reason, and the output directory must be on a filesystem all ranks see).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import atomic as ckpt
from ..errors import ConfigError, SftctlError, TrainingError
from .guards import (Preempted, Preemption, disk_full_point, fault_at, kill_self,
                     slow_step)
from .state import RunState

log = logging.getLogger("sftctl")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
CONFIG = "sftctl_config.yaml"
SHARDED = "sharded"  # torch.distributed.checkpoint directory of sharded strategies (FSDP)
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")

# config keys that may change between an interrupted run and its resumption: they do not change
# the sequence of optimizer steps (where they, or the hardware, change float rounding, the
# resumed run is still valid but no longer bit-identical)
RESUME_MAY_CHANGE = {
    "train.output_dir", "train.resume", "train.save_every", "train.keep_last", "train.quiet",
    "train.overwrite", "train.threads", "train.log_every", "train.on_nonfinite",
    "train.max_nonfinite_in_a_row", "train.device", "train.strategy", "data.num_proc",
    "data.cache_dir", "model.attn_implementation", "model.gradient_checkpointing",
    "eval.enabled", "eval.every", "eval.initial", "eval.batch_size", "eval.tasks", "eval.limit",
    "eval.benchmark_every", "eval.benchmark_limit", "eval.select_best", "eval.require",
    # the same trajectory either way; a checkpoint whose weights were held the other way is
    # refused by the layout check (``Checkpointer._check_layout``)
    "train.master_weights",
}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------- weights


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Stream tensors into a safetensors file through a Python file object.

    Our own writer (the format is an 8-byte header length, a JSON header, then the raw bytes)
    so that every write error is an ``OSError`` with its errno: ``safetensors.save_file``
    reports a full disk as ``SafetensorError`` and ``torch.save(path)`` as a ``RuntimeError``
    without one, and ``save_file`` replaces a special file at the path instead of writing into
    it. One tensor is copied at a time (GPU to CPU), never the whole model.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in a checkpoint")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            flat = t.detach().to("cpu").contiguous().reshape(-1)  # [numel]
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def save_weights(state_dict: dict, path: Path) -> None:
    """Write a state dict as safetensors; names that are the same view of one storage (tied
    weights) are written once and recorded as aliases in the metadata."""

    def key(t):
        return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                tuple(t.stride()), t.dtype)

    seen: dict = {}
    tensors, aliases = {}, {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        k = key(t)
        if k in seen:
            aliases[name] = seen[k]
            continue
        seen[k] = name
        tensors[name] = t
    write_safetensors(tensors, path, {"format": "pt", "sftctl_aliases": json.dumps(aliases)})


def load_weights(path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    sd = load_file(str(path))
    for alias, name in json.loads(meta.get("sftctl_aliases", "{}")).items():
        sd[alias] = sd[name]
    return sd


# ------------------------------------------------------------------------- finding checkpoints


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    problem: str | None  # None: complete and intact

    @property
    def complete(self) -> bool:
        return self.problem is None


def file_hash(path: Path) -> str:
    """Content hash of a checkpoint file (BLAKE2b-128: about 1 GB/s on one core, read back
    from the page cache right after the save)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def inspect_checkpoint(path: Path, verify: bool = False) -> CheckpointInfo:
    """Whether ``path`` is a complete checkpoint whose files match its marker; ``verify``: also
    their content hashes (what ``--resume`` does; rotation and listing check sizes only)."""
    path = Path(path)
    m = _STEP_DIR.match(path.name)
    step = int(m.group(1)) if m else -1
    marker = path / MARKER
    if not marker.is_file():
        return CheckpointInfo(path, step, "no completion marker (the save did not finish)")
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
        files = meta["files"]
        step = int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return CheckpointInfo(path, step, f"unreadable completion marker ({e})")
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return CheckpointInfo(path, step, f"{name} is missing")
        if f.stat().st_size != size:
            return CheckpointInfo(path, step, f"{name} has {f.stat().st_size} bytes, the marker "
                                              f"says {size}")
    if verify:  # a marker of older sftctl has no hashes: sizes only
        for name, digest in (meta.get("hashes") or {}).items():
            try:
                actual = file_hash(path / name)
            except OSError as e:
                return CheckpointInfo(path, step, f"{name} cannot be read ({e})")
            if actual != digest:
                return CheckpointInfo(path, step, f"{name} changed after the save (content "
                                                  f"hash {actual}, the marker says {digest})")
    return CheckpointInfo(path, step, None)


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """The ``step-N`` directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [inspect_checkpoint(p) for p in root.iterdir()
           if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(out, key=lambda c: (c.step, c.path.name))


def latest_checkpoint(root: Path, *, warn: bool = True,
                      verify: bool = False) -> CheckpointInfo | None:
    """The newest complete checkpoint under ``root``; incomplete newer ones are named.
    ``verify``: the content hashes must match too (resume)."""
    found = list_checkpoints(root)
    for c in reversed(found):
        if c.complete and verify:
            c = inspect_checkpoint(c.path, verify=True)
        if c.complete:
            return c
        if warn:
            log.warning("checkpoint %s is not usable: %s; trying an older one", c.path, c.problem)
    return None


def resolve_resume(spec: str, out_dir: Path | None) -> CheckpointInfo | None:
    """``latest`` -> newest complete checkpoint of ``out_dir`` (None if there is none);
    a checkpoint directory -> itself (must be complete); a run directory -> its newest."""
    if spec == "latest":
        if out_dir is None:
            raise ConfigError("train.resume: 'latest' needs --output-dir (the run to continue)")
        return latest_checkpoint(Path(out_dir) / CHECKPOINTS, verify=True)
    p = Path(spec).expanduser()
    if not p.exists():
        raise ConfigError(f"train.resume: {p} does not exist (give a checkpoint directory, a run "
                          "directory or 'latest')")
    if (p / MARKER).exists() or (p / STATE).exists() or _STEP_DIR.match(p.name):
        info = inspect_checkpoint(p, verify=True)
        if not info.complete:
            raise ConfigError(f"train.resume: {p} is not a complete checkpoint: {info.problem}")
        return info
    if (p / CHECKPOINTS).is_dir():
        info = latest_checkpoint(p / CHECKPOINTS, verify=True)
        if info is None:
            raise ConfigError(f"train.resume: {p / CHECKPOINTS} holds no complete checkpoint")
        return info
    raise ConfigError(f"train.resume: {p} is neither a checkpoint (no {MARKER}) nor a run "
                      f"directory (no {CHECKPOINTS}/)")


def run_dir_of(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent


def prepare_resume(cfg, output_dir_given: bool = True) -> None:
    """Command-line checks before the trainer is built: ``--resume`` with ``--overwrite``, the
    output directory of ``--resume PATH`` when none was given, a run that already finished."""
    spec = cfg.train.resume
    if not spec:
        return
    if cfg.train.overwrite:
        raise ConfigError("train.resume and train.overwrite exclude each other: --overwrite "
                          "starts the run again, --resume continues it")
    if not cfg.train.output_dir or not output_dir_given:
        if spec == "latest":
            raise ConfigError("train.resume: 'latest' needs --output-dir (the run to continue)")
        info = resolve_resume(spec, None)
        cfg.train.output_dir = str(run_dir_of(info.path))
    out = Path(cfg.train.output_dir)

    if ckpt.checkpoint_complete(out / "model") and (out / "summary.json").is_file():
        raise ConfigError(f"train.resume: the run in {out} already finished (model/ and "
                          "summary.json are complete); nothing to resume. Use --overwrite to "
                          "train it again or another --output-dir")


def data_fingerprint(split) -> str:
    """Hash of the tokenized training split: its example lengths and count, and the 64-bit
    digest of each example's token ids and loss mask computed during tokenization
    (``sftctl.data.encode``), in order. Any change of data, tokenizer, template or max_seq_len
    changes it, also one that keeps every length (an answer reversed). ``split``: a
    ``TokenizedSplit`` (or bare lengths: the lengths-only fingerprint of older sftctl)."""
    lengths = np.ascontiguousarray(getattr(split, "lengths", split), dtype=np.int64)
    h = hashlib.sha256(lengths.tobytes())
    h.update(str(len(lengths)).encode())
    ds = getattr(split, "dataset", None)
    if ds is not None and "digest" in ds.column_names:
        h.update(np.asarray(ds["digest"], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            out.update(_flatten(v, key + "."))
        elif k == "options" and isinstance(v, dict):
            out.update({f"options.{o}": x for o, x in v.items()})
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Trajectory-changing keys whose values differ (plugin options: only those in both)."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in RESUME_MAY_CHANGE:
            continue
        if k.startswith("options.") and (k not in a or k not in b):
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now")
    return diffs


# ----------------------------------------------------------------------------- the checkpointer


DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG,
               errno.EIO}


_ERRNO_TEXT = re.compile(r"os error (\d+)|code: (\d+)|\[Errno (\d+)\]")


def as_os_error(e: BaseException) -> OSError | None:
    """The OS error behind an exception of a library that hides it; None when there is none.

    - safetensors' Rust ``SafetensorError`` says "... (os error 28)";
    - ``torch.save`` into a file object reports a failed write as ``RuntimeError: [enforce fail
      at inline_container.cc] unexpected pos N vs M`` with the ``OSError`` in ``__context__``;
      writing to a path it has no OS error at all: a short write, mapped to ENOSPC (a full disk
      is what makes a write short; the message says so);
    - ``torch.distributed.checkpoint`` raises ``CheckpointException`` holding each rank's
      failure (``failures``), and wraps exceptions of its writer threads.
    The chain (``__cause__``, ``__context__``) is followed."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    short_write = False
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return x
        m = _ERRNO_TEXT.search(str(x))
        if m is not None:
            code = int(next(g for g in m.groups() if g))
            return OSError(code, os.strerror(code))
        short_write = short_write or "unexpected pos" in str(x)
        todo += [x.__cause__, None if x.__suppress_context__ else x.__context__]
        failures = getattr(x, "failures", None)  # DCP's CheckpointException: {rank: error}
        if isinstance(failures, dict):
            for f in failures.values():
                todo.append(f[0] if isinstance(f, tuple) else f)
    if short_write:
        return OSError(errno.ENOSPC, "no space left on the device (a short write: the disk is "
                       "full or a file-size limit was reached)")
    return None


def describe_os_error(e: OSError) -> str:
    code = errno.errorcode.get(e.errno or 0, "")
    why = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only filesystem",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large (filesystem or process file-size limit)"}.get(
        e.errno or 0, e.strerror or str(e))
    where = f" ({e.filename})" if e.filename else ""
    return f"{why} [{code or type(e).__name__}]{where}"


def _os_error(e: Exception) -> OSError:
    """Keep an OS error (also one wrapped by a library); re-raise anything else (a bug)."""
    os_err = as_os_error(e)
    if os_err is None:
        raise e
    return os_err


class Checkpointer:
    """Periodic and preemption checkpoints of one run's ``RunState``, and ``--resume``."""

    def __init__(self, run_dir: Path, state: RunState, strategy, *, save_every: int,
                 keep_last: int, total_steps: int, config: dict, config_yaml: str,
                 data_fingerprint: str, device: torch.device,
                 before_save: Callable[[int], None] | None = None,
                 faults: dict[str, str] | None = None,
                 after_save: Callable[[int, Path], None] | None = None):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.state = state
        self.strategy = strategy
        self.save_every = save_every
        self.keep_last = keep_last
        self.total_steps = total_steps
        self.config = config                # the run config as a dict, compared on resume
        self.config_yaml = config_yaml      # written next to every checkpoint
        self.fingerprint = data_fingerprint
        self.device = device
        self.before_save = before_save or (lambda step: None)
        # after a complete periodic save (the trainer calls sftctl_checkpoint_saved from it)
        self.after_save = after_save or (lambda step, path: None)
        self.faults = faults or {}
        self.sharded = bool(getattr(strategy, "sharded_state", False))
        self.preemption = Preemption()
        self.saved_step: int | None = None
        self.resumed_from: Path | None = None
        if strategy.is_main:
            self._clean_stale()

    # ------------------------------------------------------------------------------ restore

    def last_complete(self) -> Path | None:
        info = latest_checkpoint(self.root, warn=False)
        return info.path if info else None

    def restore(self, spec: str | None) -> Path | None:
        """Apply ``--resume SPEC`` (``latest`` or a path) to the state; returns the checkpoint
        resumed from, or None for a fresh start."""
        if not spec:
            return None
        info = resolve_resume(spec, self.run_dir)
        if info is None:
            incomplete = [c for c in list_checkpoints(self.root) if not c.complete]
            log.warning("--resume latest: no complete checkpoint in %s%s: starting a new run",
                        self.root, f" ({len(incomplete)} incomplete ignored)" if incomplete
                        else "")
            return None
        path = info.path
        meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
        try:
            import yaml

            saved_cfg = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TrainingError(f"{path / CONFIG}: cannot read the checkpoint's config: {e}") \
                from None
        diffs = config_differences(saved_cfg, self.config)
        if diffs:
            raise ConfigError(f"--resume {path}: this run's config differs from the checkpoint's "
                              "in keys that change training:\n  " + "\n  ".join(diffs) +
                              "\nresume with the interrupted run's options (or start a new run)")
        if meta.get("data") not in (None, self.fingerprint):
            raise ConfigError(f"--resume {path}: the tokenized training data differs from the "
                              f"checkpoint's (fingerprint {meta.get('data')} there, "
                              f"{self.fingerprint} now: other data files, tokenizer, template or "
                              "max_seq_len)")
        try:
            sd = torch.load(path / STATE, map_location="cpu", weights_only=True)
            rank = self.strategy.rank
            if rank > 0:
                sd["rng"] = torch.load(path / f"rng-rank{rank}.pt", map_location="cpu",
                                       weights_only=True)
            if not sd.get("sharded"):
                sd["model"] = load_weights(path / WEIGHTS)
        except Exception as e:  # a damaged file despite the marker: name it
            raise TrainingError(f"cannot load the checkpoint {path}: {type(e).__name__}: {e}") \
                from None
        if sd.get("format") != FORMAT:
            raise TrainingError(f"{path / STATE}: checkpoint format {sd.get('format')!r}, this "
                                f"sftctl reads format {FORMAT}")
        self._check_layout(path, sd)
        try:
            if self.sharded:  # model + optimizer shards through the strategy, the rest below
                self.strategy.load_sharded(path / SHARDED, self.state.model, self.state.optimizer)
            self.state.load_state_dict(sd, sharded=self.sharded)
        except (RuntimeError, KeyError, ValueError) as e:
            raise TrainingError(f"cannot restore the checkpoint {path}: {e}") from None
        self.resumed_from = path
        self.saved_step = self.state.counters.step
        st = self.state.counters
        log.info("resumed from %s: step %d of %d (epoch %d, micro-batch %d of the epoch)",
                 path, st.step, self.total_steps, st.epoch, st.micro_in_epoch)
        return path

    def _check_layout(self, path: Path, sd: dict) -> None:
        """The checkpoint's world size and sharding must be this run's."""
        saved_ws, ws = sd.get("world_size", 1), self.strategy.world_size
        if bool(sd.get("sharded")) != self.sharded:
            if self.sharded:
                raise TrainingError(f"{path}: the state was saved whole (by --strategy ddp or "
                                    "none); resume it with that strategy, not --strategy fsdp")
            raise TrainingError(f"{path} holds sharded state of {saved_ws} ranks; this run has "
                                f"strategy {self.strategy.name!r} with {ws}")
        if saved_ws != ws:
            raise TrainingError(f"the state was saved with world size {saved_ws}, this run has "
                                f"{ws}")
        if not self.sharded and isinstance(sd.get("model"), dict):
            # split master weights (bf16 + low half in the optimizer) vs fp32: never mixed, a
            # bf16 weight copied into an fp32 one would silently drop the low half
            params = dict(self.state.unwrap(self.state.model).named_parameters())
            for name, t in sd["model"].items():
                p = params.get(name)
                if p is not None and t.dtype != p.dtype and torch.bfloat16 in (t.dtype, p.dtype):
                    mode = "split" if t.dtype == torch.bfloat16 else "fp32"
                    raise TrainingError(f"{path}: weight {name} was saved as {t.dtype} and this "
                                        f"run holds it as {p.dtype}: the checkpoint was saved "
                                        f"with --master-weights {mode}; resume with that option")

    # ---------------------------------------------------------------------------------- save

    def step_end(self) -> None:
        """After each optimizer step (and its validation): periodic save, preemption."""
        step = self.state.counters.step
        slow_step(self.faults)
        flag = self.preemption.requested is not None
        if self.strategy.world_size > 1 and self.device.type == "cuda" and \
                step < self.total_steps:
            sig = self._agree_flag_late(flag)
        else:
            sig = self._agree_flag(flag)
        if sig:
            path = self.last_complete() if self.saved_step == step else self.save(
                reason=self.preemption.requested or "preemption")
            raise Preempted(f"{self.preemption.requested or 'a signal on another rank'} received: "
                            f"checkpoint {path} saved at step {step} of {self.total_steps}; "
                            "continue with the same command and --resume latest")
        if self.save_every and step % self.save_every == 0 and step < self.total_steps \
                and self.saved_step != step:
            self.after_save(step, self.save(reason="periodic"))

    def _agree_flag(self, flag: bool) -> bool:
        """Ranks agree on a host flag (a tiny all-reduce, only with several processes)."""
        if self.strategy.world_size <= 1:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        return int(self.strategy.all_reduce_sum(t)) > 0

    def _agree_flag_late(self, flag: bool) -> bool:
        """Multi-GPU: the ranks' agreement on the preemption flag without a host sync per step.
        This step's all-reduce is queued and read at the next step's end (waiting for that
        step's event only, ``readback.DeviceRead``); every rank reads the same sums in the same
        order, so all save at the same step, one step after the signal. The last step agrees
        at once (``_agree_flag``)."""
        from .readback import DeviceRead

        t = torch.tensor([int(flag)], dtype=torch.int32, pin_memory=True)
        summed = self.strategy.all_reduce_sum(t.to(self.device, non_blocking=True))  # [1]
        prev, self._late_flag = getattr(self, "_late_flag", None), DeviceRead(summed)
        return prev is not None and prev.values()[0] > 0

    def _disk_error(self, e: OSError, what: str) -> TrainingError:
        prev = self.last_complete()
        keep = (f"the previous checkpoint {prev} is intact (resume with --resume latest)"
                if prev else "no earlier checkpoint exists")
        return TrainingError(f"cannot save {what}: {describe_os_error(e)}; {keep}")

    def save(self, reason: str = "periodic") -> Path:
        """Write a complete checkpoint of the current state; returns its path."""
        step = self.state.counters.step
        self.before_save(step)  # the guard: never checkpoint past an unread non-finite step
        strategy, is_main = self.strategy, self.strategy.is_main
        sd = self.state.state_dict(sharded=self.sharded)
        weights = sd.pop("model", None)
        sd.update(sharded=self.sharded, format=FORMAT, world_size=strategy.world_size)
        rng = sd["rng"]
        name = step_dir_name(step)
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        t0 = time.perf_counter()
        error: OSError | None = None
        if is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
                if weights is not None:
                    disk_full_point("ckpt_weights", tmp)
                    save_weights(weights, tmp / WEIGHTS)
                if fault_at(self.faults, "save_enospc", step):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / STATE))
                disk_full_point("ckpt_state", tmp)
                # torch.save reports a failed write as RuntimeError("unexpected pos"), the
                # OSError in its __context__: as_os_error finds it
                with open(tmp / STATE, "wb") as f:
                    torch.save(sd, f)
                disk_full_point("ckpt_config", tmp)
                ckpt.write_text(tmp / CONFIG, self.config_yaml)
            except Exception as e:  # noqa: BLE001 (only OS errors are kept, see _os_error)
                error = _os_error(e)
        self._check_all(error, tmp, f"the checkpoint {final}")
        if strategy.world_size > 1 or self.sharded:  # FSDP shards even with one process
            error = None
            try:
                if strategy.rank > 0:
                    with open(tmp / f"rng-rank{strategy.rank}.pt", "wb") as f:
                        torch.save(rng, f)
                if self.sharded:  # every rank writes its shards
                    if strategy.is_main:
                        disk_full_point("ckpt_sharded", tmp)
                    strategy.save_sharded(tmp / SHARDED, self.state.model, self.state.optimizer)
            except Exception as e:  # noqa: BLE001 (only OS errors are kept, see _os_error)
                error = _os_error(e)
            self._check_all(error, tmp, f"the RNG state of rank {strategy.rank} into {final}")
        if is_main:
            try:
                self._publish(tmp, final, step, reason)
            except Exception as e:  # noqa: BLE001 (only OS errors are kept, see _os_error)
                error = _os_error(e)
        self._check_all(error, tmp, f"the checkpoint {final}")
        self.saved_step = step
        if is_main:
            self._rotate(keep=final)
            log.info("checkpoint %s saved (%s, %.1f s)", final, reason, time.perf_counter() - t0)
        return final

    def _check_all(self, error: OSError | None, tmp: Path, what: str) -> None:
        """Raise on every rank when any rank failed; rank 0 removes the temporary directory."""
        failed = self._agree_flag(error is not None)
        if not failed:
            return
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise self._disk_error(error, what) from None
        raise TrainingError(f"saving {what} failed on another rank (see its error)")

    def _publish(self, tmp: Path, final: Path, step: int, reason: str) -> None:
        """fsync, rename into place, then the completion marker (fsynced) last."""
        names = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in names}
        # content hashes: a checkpoint changed in place (same size) is not resumed silently
        hashes = {p.relative_to(tmp).as_posix(): file_hash(p) for p in names}
        ckpt.fsync_tree(tmp)
        if fault_at(self.faults, "save_before_rename", step):
            kill_self()
        aside = None
        if final.exists():  # an incomplete leftover of an earlier attempt at this step
            aside = final.parent / f".{final.name}.old"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        ckpt._fsync_dir(final.parent)
        if fault_at(self.faults, "save_before_marker", step):
            kill_self()
        st = self.state.counters
        meta = {"format": FORMAT, "step": step, "total_steps": self.total_steps,
                "epoch": st.epoch, "micro_in_epoch": st.micro_in_epoch,
                "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "world_size": self.strategy.world_size, "data": self.fingerprint,
                "files": files, "hashes": hashes}
        disk_full_point("ckpt_marker", final)
        ckpt.write_json(final / MARKER, meta)
        ckpt._fsync_dir(final)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _rotate(self, keep: Path) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; remove incomplete ones older than
        the new one. Failures here only warn: the new checkpoint is already complete."""
        found = list_checkpoints(self.root)
        complete = [c for c in found if c.complete]
        doomed = [c for c in found
                  if not c.complete and c.path != keep and c.step < self._step(keep)]
        if self.keep_last:
            doomed += [c for c in complete[:-self.keep_last] if c.path != keep]
        for c in doomed:
            try:
                shutil.rmtree(c.path)
                log.info("removed %s checkpoint %s", "old" if c.complete else
                         f"incomplete ({c.problem})", c.path)
            except OSError as e:
                log.warning("could not remove %s: %s", c.path, describe_os_error(e))

    @staticmethod
    def _step(path: Path) -> int:
        m = _STEP_DIR.match(path.name)
        return int(m.group(1)) if m else -1

    def _clean_stale(self) -> None:
        """Temporary directories left by a save that was killed (never resumed from)."""
        if not self.root.is_dir():
            return
        stale = [p for p in self.root.iterdir()
                 if p.name.startswith(".step-") and (p.name.endswith(".tmp") or
                                                     p.name.endswith(".old"))]
        for p in stale:
            try:
                shutil.rmtree(p)
            except OSError as e:
                log.warning("could not remove the leftover %s: %s", p, describe_os_error(e))
        if stale:
            log.warning("removed %d leftover temporary checkpoint director%s of an interrupted "
                        "save: %s", len(stale), "y" if len(stale) == 1 else "ies",
                        ", ".join(p.name for p in stale))

    def wrap_disk_errors(self, what: str):
        """Context manager for other writes (the final model, metrics): a disk error (full,
        read-only, permission, quota, I/O) becomes a clear ``TrainingError`` naming the
        still-good checkpoint; other exceptions pass through."""
        import contextlib

        outer = self

        @contextlib.contextmanager
        def ctx():
            try:
                yield
            except Exception as e:
                if isinstance(e, SftctlError):  # already named (by an inner wrap)
                    raise
                os_err = as_os_error(e)
                if os_err is None or os_err.errno not in DISK_ERRNOS:
                    raise
                raise outer._disk_error(os_err, what) from None
        return ctx()
