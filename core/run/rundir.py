"""The run directory of ``sftctl train``: one run at a time, nothing of the previous run lost on
``--overwrite``, leftovers of a killed run cleaned.

Design choices
- One run per directory: rank 0 takes an exclusive ``fcntl.flock`` on ``OUTPUT_DIR/.sftctl.lock``
  before anything else touches the directory. The kernel drops the lock when the process dies
  (kill -9, OOM, power loss of a client), so there is no stale lock to clean, unlike a PID
  file. The holder writes its PID, host and start time into the file, only to be named in the
  refusal of a second run. The file itself is never deleted (unlinking a lock file races with
  a process that has just opened it). Other torchrun ranks take no lock: they write only into
  directories that rank 0 created and already guards. On NFS, Linux emulates ``flock`` with
  POSIX byte-range locks, which the server arbitrates between clients.
- ``--overwrite`` never deletes the previous run first: its entries (model/, summary.json,
  metrics.jsonl, checkpoints/, report ...) are moved into ``OUTPUT_DIR/.previous-run/`` (a rename,
  same filesystem) and deleted only when the new run has something in their place: a complete
  final model or a complete checkpoint. A run that fails before that (bad data, bad model, a
  NaN at step 1) gets the previous run back. A model, tokenizer or data path inside an entry
  that ``--overwrite`` replaces is refused up front: it would be moved away under the run.
- Leftovers of a killed process (``.NAME.tmp-PID`` files and directories of the atomic writers,
  ``.NAME.old-PID`` moved-aside directories, ``.previous-run/``) are resolved when the next run
  takes the lock: the lock proves their writer is gone. A ``.NAME.old-PID`` whose ``NAME`` is
  missing (killed between the two renames of ``atomic_directory``) is renamed back; anything
  else is deleted, never read as a result. ``checkpoints/.step-N.tmp`` directories are the
  checkpointer's to remove (``Checkpointer._clean_stale``, at the same start).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("sftctl")

LOCK_NAME = ".sftctl.lock"
PREVIOUS = ".previous-run"
# what a run writes at the top of its directory (the order only matters for messages)
RUN_ENTRIES = ("model", "summary.json", "metrics.jsonl", "checkpoints", "config.yaml", "base",
               "eval", "report.json", "report.md", "report.html", "report_assets")
# entries that make a directory "hold a run" (config.yaml and base/ alone do not: a run that
# failed in setup leaves them)
RESULT_ENTRIES = ("model", "summary.json", "metrics.jsonl", "checkpoints")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def _describe(e: OSError) -> str:
    from ..training.checkpoint import describe_os_error

    return describe_os_error(e)


class RunDirLock:
    """An exclusive lock on a run directory (a context manager; ``release`` is idempotent)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.output_dir: cannot create {self.out}: {_describe(e)}") \
                from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"train.output_dir: cannot create {self.path}: {_describe(e)}") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"train.output_dir: {self.out} is in use by another sftctl run "
                                  f"({holder}); wait for it to finish or choose another "
                                  "--output-dir") from None
            raise ConfigError(f"train.output_dir: cannot lock {self.path}: {_describe(e)}") \
                from None
        # who holds it: read by a refused second run (the lock, not this text, is the truth)
        info = (f"PID {os.getpid()} on host {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:
            pass  # a full disk: the lock holds without the description
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


# ------------------------------------------------------------------------------- leftovers


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def clean_leftovers(out: Path) -> list[str]:
    """Resolve what killed writers left at the top of ``out`` (call with the lock held);
    returns what was done, one phrase per item (also logged)."""
    out = Path(out)
    done: list[str] = []
    if not out.is_dir():
        return done
    for p in sorted(out.iterdir()):
        m = _LEFTOVER.match(p.name)
        if m is None:
            continue
        final = out / m["name"]
        try:
            if m["kind"] == "old" and not final.exists():
                os.replace(p, final)
                done.append(f"restored {final.name} from {p.name} (a save was killed between "
                            "its two renames)")
            else:
                _remove(p)
                done.append(f"removed {p.name}")
        except OSError as e:
            log.warning("could not resolve the leftover %s: %s", p, _describe(e))
    if done:
        log.warning("%s: leftovers of an interrupted run: %s", out, "; ".join(done))
    return done


# ------------------------------------------------------------------------------- overwrite


def held_run(out: Path) -> list[str]:
    """The result entries present in ``out`` (empty: no run there)."""
    return [m for m in RESULT_ENTRIES if (Path(out) / m).exists()]


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_inputs_outside(out: Path, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse inputs (``(flag, path)`` pairs) inside an entry that ``--overwrite`` replaces."""
    out = Path(out)
    for flag, value in inputs:
        if not value:
            continue
        p = Path(value).expanduser()
        if not p.exists():
            continue  # a hub id or a missing path: its own check names it
        for entry in RUN_ENTRIES:
            if (out / entry).exists() and _inside(p, out / entry):
                raise ConfigError(
                    f"{flag} {value} lies inside {out / entry}, which --overwrite replaces; "
                    f"copy it out of {out} first (e.g. cp -r {out / entry} "
                    f"{out.parent / (out.name + '-' + entry)}) or choose another --output-dir")


class PreviousRun:
    """The previous run of a directory moved aside by ``--overwrite`` (see the module doc)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.aside = self.out / PREVIOUS
        self.moved: list[str] = []

    def move_aside(self) -> list[str]:
        if self.aside.exists():  # cannot happen after recover_previous; never merge two runs
            raise ConfigError(f"train.output_dir: {self.aside} exists; move it away first")
        entries = [e for e in RUN_ENTRIES if (self.out / e).exists()]
        if not entries:
            return []
        try:
            self.aside.mkdir()
            for e in entries:
                os.replace(self.out / e, self.aside / e)
                self.moved.append(e)
        except OSError as err:
            self.restore()
            raise ConfigError(f"train.output_dir: cannot move the previous run aside into "
                              f"{self.aside}: {_describe(err)}") from None
        log.info("--overwrite: the previous run (%s) is kept in %s until this run has a "
                 "checkpoint or its final model", ", ".join(entries), self.aside)
        return entries

    def restore(self) -> None:
        """Put the previous run back, replacing what the failed new run wrote."""
        if not self.aside.is_dir():
            return
        for e in sorted(p.name for p in self.aside.iterdir()):
            dest = self.out / e
            if dest.exists() or dest.is_symlink():
                _remove(dest)
            os.replace(self.aside / e, dest)
        self.aside.rmdir()
        self.moved = []

    def discard(self) -> None:
        if self.aside.exists():
            shutil.rmtree(self.aside)
        self.moved = []

    def settle(self, failed: bool) -> None:
        """End of a run: keep the new run if it has a result, else bring the previous back."""
        if not self.aside.exists():
            return
        try:
            if not failed or new_run_has_result(self.out):
                self.discard()
                if failed:
                    log.warning("the previous run of %s was replaced: this run failed but left a "
                                "complete checkpoint (continue it with --resume)", self.out)
            else:
                self.restore()
                log.warning("this run failed before writing a checkpoint or a model: the "
                            "previous run of %s is restored", self.out)
        except OSError as e:
            log.error("could not settle the previous run in %s: %s (it is still there)",
                      self.aside, _describe(e))


def new_run_has_result(out: Path) -> bool:
    from ..training.atomic import checkpoint_complete
    from ..training.checkpoint import CHECKPOINTS, latest_checkpoint

    out = Path(out)
    return checkpoint_complete(out / "model") or \
        latest_checkpoint(out / CHECKPOINTS, warn=False) is not None


def recover_previous(out: Path) -> None:
    """A ``.previous-run/`` left by a killed ``--overwrite`` run (call with the lock held)."""
    prev = PreviousRun(out)
    if not prev.aside.is_dir():
        return
    if new_run_has_result(out):
        prev.discard()
        log.warning("%s: removed the run that an interrupted --overwrite run replaced (the new "
                    "run has a complete checkpoint or model)", prev.aside)
    else:
        prev.restore()
        log.warning("%s: an --overwrite run was killed before writing a checkpoint or a model: "
                    "the previous run is restored", out)
