"""The seam between the trainer and a distributed strategy: one process, DDP or FSDP2 on torchrun.

Design choices
- The trainer never calls ``torch.distributed`` directly. It asks its ``Strategy`` for the rank
  and world size, the device, to wrap/unwrap the model, to sum a tensor over ranks, to skip
  gradient sync on all but the last micro-batch, to clip the gradient norm, to gather the full
  weights for the final save and to save/load sharded resumable state. ``select_strategy`` is the
  only place that decides which strategy runs (``--strategy auto|none|ddp|fsdp``; auto is
  ``none`` when ``WORLD_SIZE`` is 1 and ``ddp`` otherwise).
- Everything comes from torchrun's environment: ``RANK``/``WORLD_SIZE`` for sharding the data,
  ``LOCAL_RANK`` for the device (``cuda:LOCAL_RANK``), ``MASTER_ADDR``/``MASTER_PORT`` for the
  rendezvous; nothing assumes one host. The backend is NCCL on GPUs and gloo on the CPU.
- The loss of an optimizer step is normalized by the *global* number of trainable tokens (all
  micro-batches of all ranks, summed as a tensor by ``all_reduce_sum``), so each rank's gradient
  is its share of the global token-mean gradient and the ranks' gradients must be *summed*, not
  averaged. Rather than multiplying the loss by the world size (an extra pass of the fused loss'
  gradient scaling, and a rounding), the averaging is switched off where it happens: DDP gets a
  comm hook that all-reduces with SUM and no division; FSDP2 gets a gradient divide factor of 1
  with sum-only collectives. ``loss_factor`` therefore stays 1 for every strategy. N ranks with
  per-rank batch b then compute the same loss and gradients as one process with batch N*b.
- DDP: buffers are not re-synced at every forward (a causal LM's buffers, e.g. rotary
  frequencies, are deterministic and identical on every rank); gradients are bucket views.
- FSDP2 (``fully_shard``): every transformer block (the classes named in the model's
  ``_no_split_modules``) is its own FSDP unit, then the root (embeddings, final norm, head, tied
  weights) is one more. Parameters stay fp32 (the master copy the optimizer updates); a
  ``MixedPrecisionPolicy`` gathers them in the autocast dtype (bf16/fp16) for compute and reduces
  gradients in fp32. Gradient accumulation skips the reduce-scatter on non-final micro-batches
  (``set_requires_gradient_sync``).
- Saving: every rank takes part. The final model is a consolidated HF safetensors directory:
  FSDP gathers the full state dict (offloaded to the CPU, on rank 0 only) and rank 0 writes it.
  Resumable FSDP state (model + optimizer) is written with ``torch.distributed.checkpoint``
  (each rank writes its own shards; ``save_sharded``/``load_sharded``).
- Tokenization (``main_first``) runs on rank 0, then on the first rank of every other host, then
  on the rest, so a ``datasets`` cache (per host or shared) is filled once, without races.
- A multi-process launch with ``--strategy none`` is an error (N independent runs would write the
  same directory); so is a ``WORLD_SIZE`` without the rest of torchrun's environment. ``ddp`` or
  ``fsdp`` without torchrun runs as a one-process group (an in-memory store).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from pathlib import Path

import torch

from ..errors import ConfigError

log = logging.getLogger("sftctl")

STRATEGIES = ("auto", "none", "ddp", "fsdp")
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Strategy:
    """Single-process strategy; multi-process ones override the collective parts."""

    name = "none"
    #: True when the model/optimizer state is sharded across ranks and must be saved with
    #: ``save_sharded`` (torch.distributed.checkpoint) rather than as one state dict.
    sharded_state = False

    def __init__(self):
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        if requested == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"train.device: {requested!r} asked for, but CUDA is not available")
        return dev

    def wrap_model(self, model: torch.nn.Module, amp_dtype: torch.dtype | None = None
                   ) -> torch.nn.Module:
        """Wrap for data parallelism; ``amp_dtype`` is the autocast compute dtype (None: fp32)."""
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def grad_sync(self, model: torch.nn.Module, enabled: bool):
        """Context for one micro-batch's backward; ``enabled`` is False for all but the last."""
        return contextlib.nullcontext()

    @property
    def loss_factor(self) -> float:
        """Multiplier on the loss that would cancel a gradient average over ranks. Every
        strategy here sums gradients instead (see the module docstring), so it is 1."""
        return 1.0

    def clip_grad_norm_(self, params: list, max_norm: float) -> torch.Tensor:
        """Clip the gradients in place; return the global norm as a plain 0-dim tensor."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def full_state_dict(self, model: torch.nn.Module) -> dict | None:
        """The full (unsharded) weights for the final save, on rank 0; every rank must call it.
        None means: save the unwrapped model's own ``state_dict``."""
        return None

    def save_sharded(self, path, model, optimizer) -> None:
        raise NotImplementedError(f"strategy {self.name!r} keeps whole state dicts")

    def load_sharded(self, path, model, optimizer) -> None:
        raise NotImplementedError(f"strategy {self.name!r} keeps whole state dicts")

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. filling a cache), the others after it."""
        yield

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


SingleProcess = Strategy


def world_size_from_env() -> int:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world}: must be at least 1")
    return world


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(f"{name}={os.environ[name]!r} is not an integer") from None


class DistributedStrategy(Strategy):
    """DDP or FSDP2 over a process group that torchrun's environment describes."""

    def __init__(self, name: str, requested_device: str):
        import torch.distributed as dist

        super().__init__()
        if name not in ("ddp", "fsdp"):
            raise ValueError(name)
        self.name = name
        self.sharded_state = name == "fsdp"
        world = world_size_from_env()
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        if world > 1 and missing:
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch "
                              "several processes with torchrun (torchrun --nproc_per_node N -m "
                              "sftctl train ...)")
        self.world_size = world
        self.rank = _env_int("RANK") if "RANK" in os.environ else 0
        self.local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        if not 0 <= self.rank < world:
            raise ConfigError(f"RANK={self.rank} is outside [0, WORLD_SIZE={world})")
        self._device = self._resolve_device(requested_device)
        self.backend = "nccl" if self._device.type == "cuda" else "gloo"
        self._owns_group = False
        if not dist.is_initialized():
            timeout = datetime.timedelta(
                seconds=float(os.environ.get("SFTCTL_DIST_TIMEOUT_S", "1800")))
            kw = {}
            if self._device.type == "cuda":
                torch.cuda.set_device(self._device)
                kw["device_id"] = self._device  # binds NCCL's communicator to this GPU
            if missing:  # one process without torchrun (e.g. --strategy fsdp on one GPU)
                dist.init_process_group(self.backend, store=dist.HashStore(), rank=0,
                                        world_size=1, timeout=timeout, **kw)
            else:
                dist.init_process_group(self.backend, timeout=timeout, **kw)
            self._owns_group = True
        if dist.get_world_size() != world or dist.get_rank() != self.rank:
            raise ConfigError(f"the process group has rank {dist.get_rank()} of "
                              f"{dist.get_world_size()}, the environment says RANK={self.rank} "
                              f"of WORLD_SIZE={world}")
        self._mesh = None
        self.fsdp_units = 0

    # ----------------------------------------------------------------------------- device

    def _resolve_device(self, requested: str) -> torch.device:
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cpu":
            return torch.device("cpu")
        if requested.startswith("cuda:") and self.world_size > 1:
            raise ConfigError(f"train.device: {requested!r} names one GPU, but under torchrun "
                              "each rank uses cuda:LOCAL_RANK; pass --device cuda (or auto) and "
                              "choose GPUs with CUDA_VISIBLE_DEVICES")
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: {requested!r} asked for, but CUDA is not available")
        if requested.startswith("cuda:"):
            return torch.device(requested)
        n = torch.cuda.device_count()
        if self.local_rank >= n:
            raise ConfigError(f"LOCAL_RANK={self.local_rank} but this host has {n} visible GPU(s):"
                              " start at most one process per GPU (--nproc_per_node)")
        return torch.device("cuda", self.local_rank)

    def device(self, requested: str) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------ model

    def wrap_model(self, model, amp_dtype=None):
        if self.name == "ddp":
            return self._wrap_ddp(model)
        return self._wrap_fsdp(model, amp_dtype)

    def _wrap_ddp(self, model):
        from torch.nn.parallel import DistributedDataParallel as DDP

        on_gpu = self._device.type == "cuda"
        # No buffer broadcast before each forward (the Llama buffers are constants). torch 2.13
        # renamed the argument (broadcast_buffers is deprecated there); 2.11/2.12 only know the
        # old name.
        import inspect

        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else {"broadcast_buffers": False})
        ddp = DDP(model, device_ids=[self._device.index] if on_gpu else None,
                  gradient_as_bucket_view=True, **no_sync)
        ddp.register_comm_hook(None, _allreduce_sum_hook)
        return ddp

    def _wrap_fsdp(self, model, amp_dtype):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        self._mesh = init_device_mesh(self._device.type, (self.world_size,))
        # fp32 master weights; gathered in the compute dtype, gradients reduced in fp32
        mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
        block_names = set(getattr(model, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if m is not model and
                  type(m).__name__ in block_names]
        if not blocks:
            log.warning("fsdp: the model names no transformer block class (_no_split_modules="
                        "%s); the whole model is one FSDP unit (no per-block sharding)",
                        sorted(block_names))
        for block in blocks:
            fully_shard(block, mesh=self._mesh, mp_policy=mp)
        fully_shard(model, mesh=self._mesh, mp_policy=mp)
        for m in model.modules():
            if isinstance(m, FSDPModule):
                # gradients are summed over ranks (the loss is globally normalized)
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
        self.fsdp_units = len(blocks) + 1
        if self.is_main:
            log.info("fsdp: %d transformer blocks + root sharded over %d ranks, compute dtype %s",
                     len(blocks), self.world_size, amp_dtype or torch.float32)
        return model

    def unwrap(self, model):
        return model.module if self.name == "ddp" and hasattr(model, "module") else model

    # ------------------------------------------------------------------------ collectives

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def grad_sync(self, model, enabled: bool):
        if self.name == "ddp":
            return contextlib.nullcontext() if enabled else model.no_sync()
        return _fsdp_grad_sync(model, enabled)

    def clip_grad_norm_(self, params, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor
            norm = norm.full_tensor()
        return norm

    def barrier(self) -> None:
        import torch.distributed as dist

        if self._device.type == "cuda":
            dist.barrier(device_ids=[self._device.index])
        else:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        # three waves: rank 0; then the first rank of every other host (a cache may be per host
        # or shared); then the rest. Every rank passes exactly two barriers.
        wave = 0 if self.rank == 0 else 1 if self.local_rank == 0 else 2
        for _ in range(wave):
            self.barrier()
        yield
        for _ in range(2 - wave):
            self.barrier()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------------------ state

    def full_state_dict(self, model):
        if self.name == "ddp":
            return None  # every rank holds the full weights; rank 0 saves its own
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        # collective: gathers every shard; with cpu_offload only rank 0 keeps the result
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
        if not self.is_main:
            return None
        # Tied parameters (e.g. lm_head = embed_tokens) come back as separate copies; alias them
        # again so save_pretrained recognizes the tie and writes the tensor once, as it does for
        # an unsharded model.
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                if name in sd and first[id(p)] in sd:
                    sd[name] = sd[first[id(p)]]
            else:
                first[id(p)] = name
        return sd

    def save_sharded(self, path, model, optimizer) -> None:
        """Write model + optimizer state with torch.distributed.checkpoint (every rank writes
        its shards into ``path``, rank 0 the metadata)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(path))

    def load_sharded(self, path, model, optimizer) -> None:
        """Load what ``save_sharded`` wrote into the wrapped model and its optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if not (Path(path) / ".metadata").is_file():
            raise ConfigError(f"{path}: not a torch.distributed.checkpoint directory "
                              "(no .metadata)")
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optimizer": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def _allreduce_sum_hook(state, bucket):
    """DDP comm hook: sum the bucket over ranks (the default hook averages)."""
    import torch.distributed as dist

    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=state,
                          async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


@contextlib.contextmanager
def _fsdp_grad_sync(model, enabled: bool):
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def select_strategy(config) -> Strategy:
    """The strategy for this process, from ``train.strategy`` and torchrun's environment."""
    world = world_size_from_env()
    name = getattr(config.train, "strategy", "auto") if config is not None else "auto"
    device = getattr(config.train, "device", "auto") if config is not None else "auto"
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy: {name!r} is not one of {', '.join(STRATEGIES)}")
    if name == "auto":
        name = "none" if world == 1 else "ddp"
    if name == "none":
        if world > 1:
            raise ConfigError(f"launched with WORLD_SIZE={world} but --strategy none: the "
                              f"{world} processes would train independently and write the same "
                              "directory; use --strategy ddp or fsdp (or auto)")
        return SingleProcess()
    return DistributedStrategy(name, device)
