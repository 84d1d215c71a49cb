"""Split fp32 master weights: the model's Linear weights held as bf16 + the 16 low bits.

Design choices
- Under bf16 autocast the weights the GEMMs read are ``bf16(w)`` and the weight gradients come
  out of bf16 GEMMs, so a Linear layer's fp32 weight and fp32 gradient hold nothing the step
  uses beyond the fp32 master value itself. In ``split`` mode the trainer turns each eligible
  Linear weight into a bf16 parameter (the value autocast would have cast it to) and keeps the
  other 16 bits of the fp32 master as an int16 tensor in the optimizer state
  (``sftctl.ops.split_master``: the pair decodes to the exact fp32 master). The optimizer step
  (``SplitAdamW`` -> ``sftctl.ops.adamw_split_``) decodes, runs AdamW in fp32, and writes both
  halves. What it buys: gradients of those weights in bf16 (2 bytes per weight less: 13 GiB on
  an 8B model), no cast of every weight in each forward (and each recompute under activation
  checkpointing), and fewer bytes in the optimizer step and the gradient norm. What it does not
  change: the forward, the gradients and the update are those of fp32 master weights under
  autocast, except that the bf16 copy rounds exact ties (fp32 values whose low 16 bits are
  0x8000) away from zero instead of to even (one bf16 unit, for one value in 65536).
- Which weights: the ``weight`` of a plain ``nn.Linear`` that is trainable, fp32, used by that
  module only (no tying) and not the output layer (the fused head accumulates its gradient in
  fp32 across token chunks, which a bf16 gradient would round). Everything else (embeddings,
  norms, biases, the head) stays fp32 and is stepped "whole" by the same op in the same launch
  (an fp32 weight and gradient, no low half): on the 1B shape's tied 263M-parameter embedding
  torch's fused AdamW took 2.5 ms per step on an H200, at ~2.9 TB/s against the op's ~3.6, and
  the after-update check had to read those weights again.
- When: ``--master-weights auto`` turns it on where it is exact and pays: CUDA, bf16 autocast,
  one process, one micro-batch per step (accumulating micro-batches would sum bf16 gradients
  in bf16), no adapters, and an optimizer that can step split weights (the built-in ``adamw``;
  an ``OptimizerSpec`` declares it with ``split_build``). ``split`` asks for it anywhere those
  hold (CPU included: tests), ``fp32`` turns it off. The decision and its reason are logged and
  written to summary.json (``master_weights``).
- Checkpoints: resumable checkpoints hold the bf16 weights (model) and the low halves
  (optimizer state, ``master_low``), so a resume continues the exact fp32 masters. The final
  model is saved with the decoded fp32 weights: a standard HF checkpoint, as in fp32 mode.
- The gradient norm of mixed bf16/fp32 gradients is one fp32-squares, fp64-carried sum over
  all of them (``total_norm_fp32`` -> ``sftctl.ops.sum_squares``), and clipping is folded into
  the step (its ``grad_scale``), so neither rounds anything to bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .foreach import foreach_norms

MODES = ("auto", "split", "fp32")


@dataclass
class MasterWeightsChoice:
    """What the run does with fp32 master weights (summary.json ``master_weights``)."""

    mode: str                       # "split" or "fp32"
    reason: str                     # why (for auto / fp32) or what (split)
    names: list[str] = field(default_factory=list)   # the split weights
    numel: int = 0

    def describe(self) -> str:
        if self.mode == "split":
            return (f"split (bf16 weight + 16 low bits) for {len(self.names)} Linear weights, "
                    f"{self.numel:,} parameters; {self.reason}")
        return f"fp32 ({self.reason})"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "weights": len(self.names),
                "parameters": self.numel}


def eligible_weights(model: torch.nn.Module, output_weight: torch.Tensor | None
                     ) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every Linear weight the split applies to (see the module notes)."""
    uses: dict[int, int] = {}
    for _name, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out = []
    for mod_name, mod in model.named_modules():
        if type(mod) is not torch.nn.Linear:
            continue
        w = mod.weight
        if (not isinstance(w, torch.nn.Parameter) or not w.requires_grad
                or w.dtype != torch.float32 or uses.get(id(w), 0) != 1
                or (output_weight is not None and w is output_weight)):
            continue
        out.append((f"{mod_name}.weight" if mod_name else "weight", w))
    return out


def choose(asked: str, *, device: torch.device, amp_dtype: torch.dtype | None, world_size: int,
           grad_accum: int, optimizer_name: str, optimizer_splits: bool, adapters: bool,
           candidates: list[tuple[str, torch.nn.Parameter]]) -> MasterWeightsChoice:
    """Split or not, and why. ``split`` that cannot apply is an error (``ValueError``, its
    message naming what is missing); ``auto`` falls back to fp32 with the reason."""
    if asked not in MODES:
        raise ValueError(f"train.master_weights must be one of {', '.join(MODES)}, got {asked!r}")
    if asked == "fp32":
        return MasterWeightsChoice("fp32", "--master-weights fp32")
    missing = []
    if amp_dtype != torch.bfloat16:
        missing.append("bf16 autocast (--precision bf16)")
    if world_size != 1:
        missing.append("one process (DDP/FSDP reduce gradients in their own dtype)")
    if grad_accum != 1:
        missing.append("--grad-accum 1 (accumulated micro-batches would sum bf16 gradients)")
    if not optimizer_splits:
        missing.append(f"an optimizer that steps split weights (optimizer {optimizer_name!r} "
                       "registers no split_build)")
    if adapters:
        missing.append("no adapters (their few trainable weights gain nothing)")
    if not candidates:
        missing.append("a trainable fp32 nn.Linear weight besides the output layer")
    if missing:
        why = "needs " + "; ".join(missing)
        if asked == "split":
            raise ValueError(f"train.master_weights: split {why}")
        return MasterWeightsChoice("fp32", f"auto: {why}")
    if asked == "auto" and device.type != "cuda":
        return MasterWeightsChoice("fp32", "auto: split weights are used on CUDA only "
                                           "(--master-weights split asks for them here)")
    numel = sum(p.numel() for _n, p in candidates)
    return MasterWeightsChoice("split", "--master-weights " + asked,
                               [n for n, _p in candidates], numel)


@torch.no_grad()
def split_parameters(params: list[torch.nn.Parameter]) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Turn each fp32 parameter into its bf16 weight in place (same Parameter object, so the
    module, hooks and optimizer groups keep it); return ``{parameter: low half}``."""
    from ..ops.split_master import split_fp32

    lows = {}
    for p in params:
        weight, low = split_fp32(p.detach())
        p.data = weight
        lows[p] = low
    return lows


def total_norm_fp32(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` (any float dtypes), a 0-dim fp32 device tensor (torch's
    ``get_total_norm`` returns bf16 norms for bf16 gradients): ``sftctl.ops.sum_squares`` in one
    pass over every gradient when they share a device and are fp32/bf16/fp16 (on an H200 over
    the 1B shape's 1.24B gradients: 0.78 ms against 1.35 for torch's per-dtype multi-tensor
    norms, bench/results/optimizer_H200_1b_2026-12-01_s9.json), else fp32 per-tensor norms."""
    if not grads:
        return torch.zeros(())
    if len({g.device for g in grads}) == 1 and all(
            g.dtype in (torch.float32, torch.bfloat16, torch.float16) and not g.is_sparse
            for g in grads):
        from ..ops import sum_squares

        return sum_squares(grads).sqrt()
    norms = foreach_norms(grads, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


class SplitAdamW(torch.optim.AdamW):
    """AdamW whose split parameters (bf16 weight + int16 low half in ``state["master_low"]``)
    take ``sftctl.ops.adamw_split_``, and so do its other fp32 parameters ("whole" masters:
    embeddings, norms, a tied head; one launch for both layouts, at a higher bandwidth than
    torch's fused AdamW, and covered by the same nonfinite flag) unless ``step_whole=False``.
    Parameters the op does not take (non-fp32, non-contiguous, or in a group with amsgrad,
    maximize or differentiable) get torch's own AdamW step (fused where it was asked for).
    Same hyperparameters, groups, schedulers and state layout as ``AdamW`` plus
    ``master_low``; the step count of the parameters the op steps is kept on the host.
    ``grad_scale`` and ``found_inf`` (set by the grad scaler or the trainer's guard) apply to
    every parameter; a step that ``found_inf`` skips still counts in the op's bias correction
    (torch's fused step takes it back on the device), which only a run that skipped
    non-finite steps sees."""

    def __init__(self, params, lows: dict, *, step_whole: bool = True, **kwargs):
        super().__init__(params, **kwargs)
        known = {p for g in self.param_groups for p in g["params"]}
        self._split = [p for p in lows if p in known]
        if len(self._split) != len(lows):
            raise ValueError("SplitAdamW: a split parameter is not in the optimizer's groups")
        for p in self._split:
            if p.dtype != torch.bfloat16 or lows[p].dtype != torch.int16:
                raise TypeError("SplitAdamW: split parameters are bf16 with int16 low halves")
            self.state[p]["master_low"] = lows[p]
        self._split_ids = {id(p) for p in self._split}
        self._whole = [p for g in self.param_groups if step_whole and _op_takes_group(g)
                       for p in g["params"] if id(p) not in self._split_ids
                       and p.dtype == torch.float32 and p.is_contiguous()]
        self._op_ids = self._split_ids | {id(p) for p in self._whole}
        self._no_low: dict[torch.device, torch.Tensor] = {}  # a whole master's empty low half
        self.nonfinite: torch.Tensor | None = None  # see flag_nonfinite_writes

    def flag_nonfinite_writes(self, flag: torch.Tensor) -> list[torch.nn.Parameter]:
        """From now on every step of the op sets ``flag`` (a 1-element fp32 device tensor) to 1
        when it writes a weight whose bf16 value is inf or NaN (``adamw_split_``'s
        ``nonfinite``), and never clears it. Returns the parameters this covers (the split and
        whole ones the op steps), which the caller's own after-update check can then skip."""
        self.nonfinite = flag
        return list(self._split) + list(self._whole)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SplitAdamW.step takes no closure")
        # torch's step must not see the op's parameters: their gradients are lent out meanwhile
        lent = [(p, p.grad) for p in self._split + self._whole if p.grad is not None]
        for p, _g in lent:
            p.grad = None
        try:
            super().step()
        finally:
            for p, g in lent:
                p.grad = g
        if lent:
            self._op_step({id(p) for p, _g in lent})

    def _op_step(self, with_grad: set) -> None:
        from ..ops import adamw_split_

        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in with_grad]
            if not ps:
                continue
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("SplitAdamW: amsgrad and maximize are not supported")
            batches: dict[tuple, list] = {}
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError("SplitAdamW does not support sparse gradients")
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)  # host: no sync to read
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                     memory_format=torch.contiguous_format)
                    st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
                elif st["step"].device.type != "cpu":  # a state torch's fused step kept
                    st["step"] = st["step"].to("cpu", torch.float32)
                st["step"] += 1
                batches.setdefault((p.device, int(st["step"].item())), []).append(p)
            beta1, beta2 = _device_betas(group["betas"], ps[0].device)
            lr = group["lr"]
            lr = float(lr.item()) if torch.is_tensor(lr) else float(lr)
            for (_device, step), params in batches.items():
                adamw_split_([p.data for p in params],
                             [self._low_of(p) for p in params],
                             [p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                              for p in params],
                             [self.state[p]["exp_avg"] for p in params],
                             [self.state[p]["exp_avg_sq"] for p in params],
                             lr=lr, beta1=beta1, beta2=beta2,
                             eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                             step=step, grad_scale=grad_scale, found_inf=found_inf,
                             nonfinite=self.nonfinite)

    def _low_of(self, p: torch.Tensor) -> torch.Tensor:
        if id(p) in self._split_ids:
            return self.state[p]["master_low"]
        if p.device not in self._no_low:
            self._no_low[p.device] = torch.empty(0, dtype=torch.int16, device=p.device)
        return self._no_low[p.device]

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to the parameter's dtype (bf16 here) and moves
        fused step counts to the device; the state of the parameters the op steps is put back
        as saved, with its step count on the host."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, params):
            if id(p) not in self._op_ids:
                continue
            saved = state_dict["state"].get(idx)
            if id(p) in self._split_ids and (saved is None or "master_low" not in saved):
                raise ValueError("SplitAdamW.load_state_dict: the state has no master_low for a "
                                 "split weight (saved with --master-weights fp32?)")
            if saved is None:
                continue
            self.state[p] = {k: (v.detach().clone() if k == "step" else
                                 v.detach().to(device=p.device, copy=True))
                             for k, v in saved.items()}
            self.state[p]["step"] = self.state[p]["step"].to("cpu", torch.float32)


def _op_takes_group(group: dict) -> bool:
    """Whether ``adamw_split_`` can step a group's whole fp32 parameters (it has no amsgrad,
    maximize or differentiable variant)."""
    return not (group.get("amsgrad") or group.get("maximize") or group.get("differentiable"))


def _device_betas(betas, device: torch.device) -> tuple[float, float]:
    """The betas as the device's torch fused AdamW uses them, so split and fp32 weights follow
    one rule: its CUDA kernel computes with fp32 betas (1 - 0.999 comes out 1.3e-5 smaller than
    exact), its CPU kernel with doubles."""
    if device.type == "cuda":
        return tuple(float(torch.tensor(float(b), dtype=torch.float32)) for b in betas)
    return float(betas[0]), float(betas[1])


@torch.no_grad()
def full_precision_state_dict(model: torch.nn.Module, optimizer: SplitAdamW,
                              names: list[str]) -> dict:
    """``model.state_dict()`` with each split weight decoded to its fp32 master (on the CPU, so
    the save adds no device memory): what the final HF checkpoint holds."""
    from ..ops.split_master import join_fp32

    sd = model.state_dict()
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        low = optimizer.state[p]["master_low"]
        sd[name] = join_fp32(p.detach().cpu(), low.cpu())
    return sd

