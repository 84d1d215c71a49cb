"""Run guards: non-finite loss/gradient detection, preemption signals, and test fault injection.

Design choices
- Non-finite guard. Each optimizer step computes, on the device, ``bad = not isfinite(loss) or
  not isfinite(grad_norm)`` (the loss only under fp16, where a non-finite gradient is the grad
  scaler's normal overflow signal). What happens next depends on where reading that flag is free:
  * ``host`` mode (CPU, where a read is not a device sync; or CUDA with an optimizer that cannot
    skip an update on the device): the flag is read every step; a bad step is never applied:
    ``stop`` raises ``TrainingError`` naming the step before ``optimizer.step``; ``skip`` does
    not call ``optimizer.step`` (weights and optimizer state unchanged), counts the step, and
    stops after ``max_nonfinite_in_a_row`` in a row. This is what torch's own GradScaler does
    for such optimizers (it reads its inf flag every step).
  * ``device`` mode (CUDA with an optimizer that takes ``found_inf``, as torch's fused
    Adam/AdamW/SGD do; the built-in ``adamw`` is fused on CUDA): the flag goes to the
    optimizer as ``found_inf``, so the fused kernel leaves weights, moments and step count
    untouched on a bad step without any host sync. Counters live on the device and are read
    only where the trainer syncs anyway: at ``--log-every`` boundaries (where the loss and
    grad norm are read for logging) and before every checkpoint. Under ``stop`` the mask is
    sticky (every update after the first bad step is masked too), so when the flag is read
    the weights are still those from before the first bad step; the error names that step.
    Under fp16 the grad scaler already skips the bad step (a non-finite loss gives non-finite
    gradients); the guard counts and stops at the next read.
  Chosen over "read the grad norm synced for logging" alone because that lets a NaN update
  through on every step between two logging boundaries.
  With the trainer's deferred reads (CUDA, ``--async-metrics``) the counters are not read at the
  logging step itself: ``snapshot`` folds them into the step's metrics vector on the device (a
  device collective across ranks, no host read) and starts a new window, and ``fold`` judges the
  host copy once the next step has been queued. ``_poisoned`` and the in-a-row run carry over
  the window, so under ``stop`` every update from the bad step on stays masked until ``fold``
  raises; ``sync`` (before any checkpoint and at the end) still reads whatever is left.
- Non-finite parameters after an update (``check_params``): a finite loss and gradient norm do
  not make a finite update (``--lr`` too large for fp32, a zero Adam denominator). After every
  step the largest |p| of each parameter is reduced on the device (``torch._foreach_norm`` with
  ord=inf, one call per dtype: NaN/inf propagate, finite weights cannot overflow it; one read
  of the weights, small next to the optimizer's own reads of weights, gradients and moments).
  Weights whose optimizer step checks what it writes (``SplitAdamW.flag_nonfinite_writes``: the
  split master weights and the fp32 ones it steps whole, i.e. every weight of a split run) are
  not read again: the step sets a device flag (``written_flag``) that joins the same verdict. Host mode reads it every
  step; device mode keeps the first bad step in a device counter read with the other flags (at
  logging boundaries and before every save). The update is already applied, so both policies
  stop; with the read before every save, no checkpoint or final model holds a non-finite weight.
- Preemption: SIGTERM/SIGINT only set a flag (handlers do no I/O); the trainer saves a
  checkpoint at the next step boundary and exits with ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL:
  "try again later"). A second signal exits at once with 128 + the signal number; an atomic
  save interrupted that way leaves the previous checkpoint intact.
- Fault injection for the reliability tests: ``SFTCTL_FAULT`` holds comma-separated
  ``name[:arg]`` items, read once when the trainer is set up and logged as a warning. Only this
  module and the checkpoint writer act on them; unknown names are a ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

import torch

from ..errors import ConfigError, TrainingError
from .foreach import foreach_norms

log = logging.getLogger("sftctl")

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: temporary failure, run again (with --resume)

FAULTS = {
    "nan_at_step": "multiply the logits of training step N (or steps N-M) by NaN",
    "slow_steps": "sleep SECONDS after every training step (gives a test time to send signals)",
    "save_before_rename": "SIGKILL the process after a checkpoint is written, before its rename "
                          "(optionally only at step N)",
    "save_before_marker": "SIGKILL the process after the rename, before the completion marker "
                          "(optionally only at step N)",
    "save_enospc": "fail a checkpoint write with ENOSPC halfway through (optionally at step N)",
    "disk_full_at": "fill the (small, <= 256 MiB) filesystem right before write site SITE, so "
                    "that the real write fails with the real ENOSPC: " + ", ".join(
                        ("ckpt_weights", "ckpt_state", "ckpt_config", "ckpt_marker",
                         "ckpt_sharded", "model_weights", "model_tokenizer", "model_files",
                         "summary")),
}
FILL_LIMIT = 256 * 2**20  # disk_full_at refuses to fill a larger filesystem (a real disk)


class Preempted(TrainingError):
    """Training stopped on SIGTERM/SIGINT after saving a resumable checkpoint."""

    exit_code = EXIT_PREEMPTED


def parse_faults(spec: str | None = None) -> dict[str, str]:
    """``"nan_at_step:3,slow_steps:0.2"`` -> ``{"nan_at_step": "3", "slow_steps": "0.2"}``."""
    spec = os.environ.get("SFTCTL_FAULT", "") if spec is None else spec
    out: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, arg = item.partition(":")
        if name not in FAULTS:
            raise ConfigError(f"SFTCTL_FAULT: unknown fault {name!r}; known: "
                              f"{', '.join(sorted(FAULTS))}")
        out[name] = arg
    return out


def fault_at(faults: dict[str, str], name: str, step: int) -> bool:
    """Whether fault ``name`` fires at ``step`` (no argument: at every step)."""
    if name not in faults:
        return False
    arg = faults[name]
    try:
        return not arg or int(arg) == step
    except ValueError:
        raise ConfigError(f"SFTCTL_FAULT: {name}:{arg}: expected a step number") from None


def disk_full_point(site: str, directory) -> None:
    """``disk_full_at:SITE`` fault: fill the filesystem of ``directory`` now, so that the next
    write (by whatever library) meets a real full disk. Tests mount a small tmpfs for it."""
    spec = os.environ.get("SFTCTL_FAULT", "")
    if "disk_full_at" not in spec or parse_faults(spec).get("disk_full_at") != site:
        return
    st = os.statvfs(directory)
    if st.f_blocks * st.f_frsize > FILL_LIMIT:
        raise ConfigError(f"SFTCTL_FAULT disk_full_at:{site}: refusing to fill {directory}, a "
                          f"filesystem larger than {FILL_LIMIT >> 20} MiB (mount a small tmpfs)")
    log.warning("SFTCTL_FAULT: filling the filesystem of %s before %s", directory, site)
    chunk = b"\0" * 65536
    with open(os.path.join(directory, ".sftctl-disk-fill"), "ab", buffering=0) as f:
        for size in (65536, 4096, 512, 1):  # down to the last byte
            try:
                while True:
                    f.write(chunk[:size])
            except OSError:
                pass


def kill_self() -> None:
    """What a crash or ``kill -9`` does: no cleanup, no atexit, no flush."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached


# ----------------------------------------------------------------------------- non-finite guard


class NonFiniteGuard:
    """Decides whether an optimizer step is applied; see the module docstring."""

    def __init__(self, *, policy: str, limit: int, counters, optimizer, scaling: bool,
                 device: torch.device, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                 world_size: int = 1, last_checkpoint: Callable[[], object] | None = None,
                 params: list[torch.Tensor] | None = None,
                 written_flag: torch.Tensor | None = None):
        """``counters``: the run's ``TrainState`` (updated in place); ``scaling``: a grad
        scaler is active (fp16); ``all_reduce_sum``/``world_size``: the strategy's, so every
        rank decides alike; ``last_checkpoint``: the newest complete checkpoint (for messages);
        ``params``: the trained parameters, checked after each update (``check_params``);
        ``written_flag``: a device flag the optimizer step sets when it writes a non-finite
        weight (for the parameters it covers, left out of ``params``)."""
        self.params = [p for p in (params or []) if p.numel()]
        self.written_flag = written_flag
        self.policy = policy
        self.limit = limit
        self.counters = counters
        self.device = device
        self.scaling = scaling
        self.all_reduce_sum = all_reduce_sum
        self.world_size = world_size
        self.last_checkpoint = last_checkpoint or (lambda: None)
        can_mask = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        if self.device.type != "cuda":
            self.mode = "host"
        elif self.scaling or can_mask:
            self.mode = "device"
        else:
            self.mode = "host"
            log.info("non-finite guard: optimizer %s cannot skip an update on the device; its "
                     "flag is read every step (one host sync per step, as GradScaler does)",
                     type(optimizer).__name__)
        self.skipped_now = False  # the current step was skipped (known on the host)
        self._found_inf: torch.Tensor | None = None
        self._reset_device_counters()

    # -- device-side counters (device mode); read and folded into TrainState by ``sync``
    def _reset_device_counters(self) -> None:
        z = lambda dt: torch.zeros((), dtype=dt, device=self.device)  # noqa: E731
        self._poisoned = z(torch.float32)   # stop: 1 from the first bad step on
        self._count = z(torch.float32)      # skip: bad steps since the last read
        self._first = z(torch.long)         # first bad step since the last read (0: none)
        self._last = z(torch.long)          # last bad step since the last read
        run = float(self.counters.nonfinite_in_a_row)
        self._run = torch.full((), run, dtype=torch.float32, device=self.device)
        self._max_run = self._run.clone()
        self._params_bad = z(torch.long)    # first step whose update made a parameter non-finite
        self._pending = False

    def reset_from_counters(self) -> None:
        """Start over from the counters (after a resume restored them)."""
        self._reset_device_counters()

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, sync: bool) -> bool:
        """Call after clipping, before the optimizer step. Returns False when the host knows
        the step must not be applied (skip); raises ``TrainingError`` when the run must stop.
        ``sync``: the caller reads the loss on the host at this step anyway."""
        finite = torch.isfinite(loss)
        if not self.scaling:
            finite = finite & torch.isfinite(grad_norm)
        self.skipped_now = False
        self._found_inf = None
        if self.mode == "host":
            if self._all_ranks(~finite) == 0:
                self.counters.nonfinite_in_a_row = 0
                return True
            self._on_bad_host(step, float(loss), float(grad_norm))
            self.skipped_now = True
            return False
        bad = ~finite                                   # 0-dim bool, stays on the device
        badf = bad.to(torch.float32)
        self._first = torch.where((self._first == 0) & bad, step, self._first)
        self._last = torch.where(bad, step, self._last)
        if self.policy == "stop":
            self._poisoned = torch.maximum(self._poisoned, badf)
            self._found_inf = self._poisoned
        else:
            self._count = self._count + badf
            self._run = (self._run + 1.0) * badf
            self._max_run = torch.maximum(self._max_run, self._run)
            self._found_inf = badf
        self._pending = True
        if sync:
            self.skipped_now = bool(bad)  # read with the loss: no extra sync
            self.sync(step)
        return True

    def check_params(self, step: int, sync: bool) -> None:
        """Call after the optimizer step: a finite loss and gradient norm can still give a
        non-finite update (``--lr`` overflowing, a zero Adam denominator). The largest |p| of
        each parameter is computed on the device (NaN and inf propagate into it, and unlike a
        2-norm it cannot overflow for finite weights): one read of the weights, no host sync
        in device mode, where the flag is read with the loss (``sync``) and before any save.
        Such an update cannot be undone, so the run stops under either policy."""
        if not self.params and self.written_flag is None:
            return
        bad = None
        if self.params:
            local = [getattr(p, "_local_tensor", p).detach() for p in self.params]  # FSDP: shard
            peak = torch.stack(foreach_norms(local, float("inf"))).max()
            bad = ~torch.isfinite(peak)
        if self.written_flag is not None:
            wrote = self.written_flag.reshape(()) != 0
            bad = wrote if bad is None else bad | wrote
        if self.mode == "host":
            if self._all_ranks(bad) > 0:
                raise TrainingError(self._params_message(step))
            return
        self._params_bad = torch.where((self._params_bad == 0) & bad, step, self._params_bad)
        self._pending = True
        if sync:
            self.sync(step)

    def _params_message(self, step: int, detected: int | None = None) -> str:
        late = "" if detected in (None, step) else f" (detected at step {detected})"
        return (f"step {step}: the optimizer update made parameters non-finite although the loss "
                f"and gradient norm were finite{late}: the update overflowed (check --lr, "
                "--adam-eps, --betas, --grad-clip)" + self._stop_hint(suggest_skip=False))

    def _message(self, step: int, loss: float, grad_norm: float) -> str:
        return (f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                "the step was not applied")

    def _on_bad_host(self, step: int, loss: float, grad_norm: float) -> None:
        st = self.counters
        if self.policy == "stop":
            raise TrainingError(self._message(step, loss, grad_norm) + self._stop_hint())
        st.nonfinite_skipped += 1
        st.nonfinite_in_a_row += 1
        st.nonfinite_last_step = step
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s): step skipped "
                    "(%d skipped so far, %d in a row)", step, loss, grad_norm,
                    st.nonfinite_skipped, st.nonfinite_in_a_row)
        if st.nonfinite_in_a_row >= self.limit:
            raise TrainingError(f"{st.nonfinite_in_a_row} non-finite steps in a row (the last "
                                f"at step {step}; --max-nonfinite-in-a-row {self.limit})"
                                + self._stop_hint(suggest_skip=False))

    def _stop_hint(self, suggest_skip: bool = True) -> str:
        """``suggest_skip``: only where ``--on-nonfinite skip`` would have let the run go on
        (not when it is the policy already, nor for an update that cannot be skipped)."""
        last = self.last_checkpoint()
        where = f"the last checkpoint {last} is untouched" if last else "no checkpoint was saved"
        advice = "Check the data and the learning rate"
        if suggest_skip and self.policy != "skip":
            advice += ", or pass --on-nonfinite skip"
        return f"; training stopped and nothing was saved ({where}). {advice}"

    def sync(self, step: int) -> None:
        """Read the device counters (device mode): raise when the run must stop, else fold them
        into ``TrainState``. Called at logging boundaries and before every checkpoint."""
        if self.mode == "host" or not self._pending:
            return
        st = self.counters
        first, last = int(self._first), int(self._last)
        bad_update = int(self._params_bad)
        if self._all_ranks(self._params_bad) > 0:
            raise TrainingError(self._params_message(bad_update or step, step))
        if self.policy == "stop":
            if self._all_ranks(self._poisoned) > 0:
                detail = "" if first == step else (
                    f" (the flag is read every --log-every steps on the GPU: detected at step "
                    f"{step}; no update was applied from step {first} on)")
                raise TrainingError(f"step {first}: non-finite loss or gradient norm; the step "
                                    f"was not applied{detail}" + self._stop_hint())
        else:
            count, run = int(self._count), int(self._run)
            max_run = int(self._max_run) if self._all_ranks(self._max_run >= self.limit) == 0 \
                else self.limit
            if count:
                st.nonfinite_skipped += count
                st.nonfinite_last_step = last
                log.warning("non-finite loss or gradient norm: %d step(s) skipped between steps "
                            "%d and %d (%d skipped so far)", count, first, last,
                            st.nonfinite_skipped)
            st.nonfinite_in_a_row = run
            if max_run >= self.limit:
                raise TrainingError(f"{max_run} non-finite steps in a row (by step {last}; "
                                    f"--max-nonfinite-in-a-row {self.limit})"
                                    + self._stop_hint(suggest_skip=False))
        self._reset_device_counters()

    # -- deferred reads (the trainer's async metrics): a snapshot travels with a step's metrics
    SNAPSHOT = ("count", "first", "last", "run", "max_run", "params_bad", "poisoned",
                "any_poisoned", "any_params_bad", "any_limit")

    def snapshot(self) -> torch.Tensor | None:
        """Device mode: the counters since the last read as one fp64 device vector (decisions
        summed over ranks by a device collective: no host read), and a new window started.
        ``_poisoned`` (sticky under stop) and the in-a-row run carry over, so every update
        after a bad step stays masked until the snapshot is read (``fold``)."""
        if self.mode == "host" or not self._pending:
            return None
        d = lambda t: t.to(torch.float64).reshape(1)  # noqa: E731
        local = [d(self._count), d(self._first), d(self._last), d(self._run), d(self._max_run),
                 d(self._params_bad), d(self._poisoned)]
        decide = torch.cat([d(self._poisoned), d((self._params_bad > 0).to(torch.float64)),
                            d((self._max_run >= self.limit).to(torch.float64))])  # [3]
        if self.world_size > 1:
            decide = self.all_reduce_sum(decide)
        snap = torch.cat(local + [decide])  # [len(SNAPSHOT)]
        z = lambda dt: torch.zeros((), dtype=dt, device=self.device)  # noqa: E731
        self._count = z(torch.float32)
        self._first = z(torch.long)
        self._last = z(torch.long)
        self._max_run = self._run.clone()
        self._params_bad = z(torch.long)
        self._pending = False
        return snap

    def fold(self, values: list[float], step: int) -> bool:
        """Host values of a ``snapshot`` taken at ``step``: raise when the run must stop (as
        ``sync`` would), else fold the skipped steps into ``TrainState``. Returns whether
        ``step`` itself was skipped."""
        v = dict(zip(self.SNAPSHOT, values))
        st = self.counters
        first, last = int(v["first"]), int(v["last"])
        if v["any_params_bad"] > 0:
            raise TrainingError(self._params_message(int(v["params_bad"]) or step, step))
        if self.policy == "stop":
            if v["any_poisoned"] > 0:
                first = first or st.nonfinite_last_step or step
                detail = "" if first == step else (
                    f" (the flag is read every --log-every steps on the GPU: detected at step "
                    f"{step}; no update was applied from step {first} on)")
                raise TrainingError(f"step {first}: non-finite loss or gradient norm; the step "
                                    f"was not applied{detail}" + self._stop_hint())
            return False
        count = int(v["count"])
        if count:
            st.nonfinite_skipped += count
            st.nonfinite_last_step = last
            log.warning("non-finite loss or gradient norm: %d step(s) skipped between steps "
                        "%d and %d (%d skipped so far)", count, first, last, st.nonfinite_skipped)
        st.nonfinite_in_a_row = int(v["run"])
        if v["any_limit"] > 0:
            max_run = max(int(v["max_run"]), self.limit)
            raise TrainingError(f"{max_run} non-finite steps in a row (by step {last}; "
                                f"--max-nonfinite-in-a-row {self.limit})"
                                + self._stop_hint(suggest_skip=False))
        return bool(count) and last == step

    def _all_ranks(self, t: torch.Tensor) -> float:
        """Host value of ``t`` summed over ranks, so every rank takes the same decision (the
        loss is per rank; under fp16 only the loss is checked)."""
        if self.world_size > 1:
            t = self.all_reduce_sum(t.to(torch.float32))
        return float(t)

    @contextlib.contextmanager
    def masked_update(self, optimizer, grad_divisor: torch.Tensor | None = None):
        """Hand the device flag to an optimizer that supports it (device mode, no scaler), and
        ``grad_divisor`` (the folded gradient clip, a device scalar the step divides by; in
        host mode the step was already decided on the host and only the divisor goes)."""
        if self._found_inf is None or self.scaling or self.mode == "host":
            if grad_divisor is None:
                yield
                return
            if self.scaling or not getattr(optimizer, "_step_supports_amp_scaling", False):
                raise RuntimeError("a folded gradient clip needs an optimizer that takes a "
                                   "grad_scale and no grad scaler")
            optimizer.grad_scale = grad_divisor
            try:
                yield
            finally:
                del optimizer.grad_scale
            return
        optimizer.grad_scale = grad_divisor
        optimizer.found_inf = self._found_inf
        try:
            yield
        finally:
            del optimizer.grad_scale, optimizer.found_inf


def install_nan_fault(faults: dict[str, str], model: torch.nn.Module, counters) -> None:
    """``nan_at_step:N[-M]`` fault: the logits of training steps N..M become NaN (a forward
    hook on the output layer of the unwrapped ``model``; ``counters``: the run's TrainState)."""
    arg = faults["nan_at_step"]
    try:
        lo, _, hi = arg.partition("-")
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"SFTCTL_FAULT: nan_at_step:{arg}: expected N or N-M") from None
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError("SFTCTL_FAULT nan_at_step: the model has no output embeddings")

    # the output layer's *input* is poisoned, so the logits and the loss are NaN whether the
    # loss is computed from the logits or fused with the head (training/head.py)
    def poison(module, args):
        if module.training and first <= counters.step + 1 <= last:
            return (args[0] * float("nan"),) + tuple(args[1:])
        return None

    head.register_forward_pre_hook(poison)
    log.warning("SFTCTL_FAULT: the logits of training steps %d-%d will be NaN", first, last)


# ---------------------------------------------------------------------------------- preemption


class Preemption:
    """Context manager: SIGTERM/SIGINT set ``requested``; a second signal exits at once."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            # second signal: leave now (an interrupted atomic save keeps the previous checkpoint)
            os.write(2, f"\nsftctl: second {name}: exiting at once\n".encode())
            os._exit(128 + signum)
        self.requested = name
        os.write(2, f"\nsftctl: {name} received: saving a checkpoint at the end of this step "
                    f"(send it again to exit at once)\n".encode())

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: preemption signals are not handled")
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False


def slow_step(faults: dict[str, str]) -> None:
    """``slow_steps:SECONDS`` fault: make every step take a while (signal/kill tests)."""
    if "slow_steps" in faults:
        time.sleep(float(faults["slow_steps"] or 0.2))
    sys.stderr.flush()
