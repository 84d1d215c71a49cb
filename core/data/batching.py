"""Batching: deterministic micro-batch plans (padded or packed) and collation into tensors.

Design choices
- Batch plans are deterministic functions of (seed, epoch): a seeded permutation, then either
  fixed-size padded micro-batches or first-fit packing into rows of ``max_seq_len`` tokens. A
  resumed run rebuilds the same plan and skips the consumed micro-batches; a distributed run
  builds the global plan and takes its rank's rows of every micro-batch (see ``BatchPlan``).
- Packed rows are padding-free: documents are concatenated, ``position_ids`` restart at 0 per
  document and no 2-D attention mask is passed. transformers 5 then derives a block-diagonal
  mask from the position ids (sdpa/eager) or uses varlen kernels (flash attention), so attention
  never crosses documents; ``document_ids`` also go to the label op so that no target crosses a
  document boundary.
- Batches also carry ``cu_seqlens`` (int32 cumulative segment lengths over the flattened
  ``B * T`` tokens: each document (a padded row's one example), then each row's padding tail as a
  segment of its own) and ``max_seqlen`` (a Python int), built here on the host, for varlen
  attention kernels (``sftctl.training.attention``): the attention path needs neither a mask
  nor a device sync to find the documents. ``Batch.to`` copies from pinned memory with ``non_blocking=True`` on CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .encode import TokenizedSplit

log = logging.getLogger("sftctl")

# ------------------------------------------------------------------------------------ batching


@dataclass
class BatchPlan:
    """Deterministic micro-batch plan of one epoch.

    A micro-batch is a list of rows; a row is a list of example indices (one example when not
    packing). The global plan holds ``batch_size * world_size`` rows per micro-batch; rank r
    trains on rows ``[r * batch_size, (r + 1) * batch_size)`` of each, so the examples of one
    optimizer step are the same whatever the world size. The epoch's last micro-batch is split
    as evenly as possible; when it has fewer rows than ranks, the ranks left without a row get a
    ``FillerRow`` (no example is dropped, and every rank runs the same number of steps).
    """

    lengths: np.ndarray
    batch_size: int
    max_seq_len: int
    packing: bool
    seed: int
    shuffle: bool = True
    world_size: int = 1
    rank: int = 0

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.lengths))

    def rows(self, epoch: int) -> list[list[int]]:
        order = self.order(epoch)
        if not self.packing:
            return [[int(i)] for i in order]
        return pack_first_fit(order, self.lengths, self.max_seq_len)

    def global_batches(self, epoch: int) -> list[list[list[int]]]:
        rows = self.rows(epoch)
        per = self.batch_size * self.world_size
        return [rows[i:i + per] for i in range(0, len(rows), per)]

    def batches(self, epoch: int) -> list[list[list[int]]]:
        """This rank's micro-batches for ``epoch``."""
        out = []
        for b in self.global_batches(epoch):
            if self.world_size == 1:
                out.append(b)
                continue
            # split the (possibly short) last batch as evenly as possible
            k, r = divmod(len(b), self.world_size)
            if k == 0 and self.rank >= r:  # no row left for this rank in the tail batch
                out.append([FillerRow(b[0])])
                continue
            start = self.rank * k + min(self.rank, r)
            out.append(b[start:start + k + (1 if self.rank < r else 0)])
        return out

    def num_batches(self, epoch: int = 0) -> int:
        if not self.packing:
            n = len(self.lengths)
            per = self.batch_size * self.world_size
            return -(-n // per)
        return len(self.global_batches(epoch))


class FillerRow(list):
    """A copy of a real row for a rank that has none in the epoch's last micro-batch: the rank
    still runs forward/backward (the collectives of DDP/FSDP need every rank), but ``collate``
    masks all its targets, so it adds nothing to the loss or the gradient and is counted as
    neither an example nor a token."""


def pack_first_fit(order: Iterable[int], lengths: np.ndarray, capacity: int,
                   open_rows: int = 16) -> list[list[int]]:
    """Pack examples (in the given order) into rows of at most ``capacity`` tokens.

    First fit over a window of ``open_rows`` open rows keeps the order roughly random while
    filling rows well; when no open row fits, the fullest one is closed.
    """
    done: list[list[int]] = []
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = int(lengths[i])
        for j, s in enumerate(space):
            if n <= s:
                rows[j].append(int(i))
                space[j] -= n
                break
        else:
            if len(rows) >= open_rows:
                j = int(np.argmin(space))
                done.append(rows.pop(j))
                space.pop(j)
            rows.append([int(i)])
            space.append(capacity - n)
    done.extend(rows)
    return done


@dataclass
class Batch:
    """Tensors of one micro-batch. ``attention_mask`` is None for packed batches."""

    input_ids: Any       # [B, T] int64
    loss_mask: Any       # [B, T] int64
    attention_mask: Any  # [B, T] int64 or None
    position_ids: Any    # [B, T] int64 or None
    document_ids: Any    # [B, T] int64 or None
    num_tokens: int      # real (non-pad) tokens
    num_examples: int
    cu_seqlens: Any = None  # [S + 1] int32 segment starts over the flat B*T tokens
    max_seqlen: int = 0     # longest segment (host int)

    def tensors(self) -> dict:
        return {k: getattr(self, k) for k in ("input_ids", "loss_mask", "attention_mask",
                                              "position_ids", "document_ids", "cu_seqlens")}

    def to(self, device) -> "Batch":
        """A copy on ``device``; from the CPU to CUDA the tensors are pinned first so the copies
        are asynchronous (``non_blocking``: the host does not wait for them)."""
        import torch

        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()

        def mv(t):
            if t is None:
                return None
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        moved = {k: mv(t) for k, t in self.tensors().items()}
        return Batch(num_tokens=self.num_tokens, num_examples=self.num_examples,
                     max_seqlen=self.max_seqlen, **moved)

    def model_inputs(self, varlen: bool = False) -> dict:
        """Forward kwargs; ``varlen``: also the packed documents for the ``sftctl_varlen``
        attention (``cu_seq_lens_q/k``, ``max_length_q/k``)."""
        kw = {"input_ids": self.input_ids, "use_cache": False}
        if self.attention_mask is not None:
            kw["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            kw["position_ids"] = self.position_ids
        if varlen and self.cu_seqlens is not None:
            kw.pop("attention_mask", None)
            if self.position_ids is not None:  # packed: the documents replace the mask
                kw.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                          max_length_q=int(self.max_seqlen), max_length_k=int(self.max_seqlen))
            # unpacked: right-padded rows, each one causal sequence (exact for the real tokens;
            # the default positions 0..T-1 are the example's own), no mask, no segments
        return kw


def collate(split: TokenizedSplit, rows: list[list[int]], *, pad_id: int, packing: bool) -> Batch:
    """Build a micro-batch from rows of example indices (dynamic padding to the longest row)."""
    import torch

    flat = [i for row in rows for i in row]
    fetched = dict(zip(flat, split.rows(flat)))
    seqs, masks, pos, docs = [], [], [], []
    for row in rows:
        ids_r, m_r, p_r, d_r = [], [], [], []
        for d, i in enumerate(row):
            ids, m = fetched[i]
            ids_r.extend(ids)
            m_r.extend([0] * len(m) if isinstance(row, FillerRow) else m)
            p_r.extend(range(len(ids)))
            d_r.extend([d] * len(ids))
        seqs.append(ids_r), masks.append(m_r), pos.append(p_r), docs.append(d_r)
    T = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros((B, T), dtype=torch.long)        # [B, T]
    attn = torch.zeros((B, T), dtype=torch.long)             # [B, T]
    position_ids = torch.zeros((B, T), dtype=torch.long)     # [B, T]
    document_ids = torch.full((B, T), -1, dtype=torch.long)  # [B, T]; -1 = padding
    for b in range(B):
        n = len(seqs[b])
        input_ids[b, :n] = torch.tensor(seqs[b])
        loss_mask[b, :n] = torch.tensor(masks[b])
        attn[b, :n] = 1
        position_ids[b, :n] = torch.tensor(pos[b])
        # padding is its own "document" with positions restarting at 0, so the packed mask
        # derived from position ids keeps real tokens from attending to it
        position_ids[b, n:] = torch.arange(T - n)
        document_ids[b, :n] = torch.tensor(docs[b])
    real = [not isinstance(row, FillerRow) for row in rows]
    num_tokens = sum(len(s) for s, keep in zip(seqs, real) if keep)
    num_examples = sum(len(row) for row, keep in zip(rows, real) if keep)
    cu_seqlens, max_seqlen = segment_bounds(rows, seqs, fetched, T)
    if packing:
        return Batch(input_ids, loss_mask, None, position_ids, document_ids, num_tokens,
                     num_examples, cu_seqlens, max_seqlen)
    return Batch(input_ids, loss_mask, attn, None, None, num_tokens, num_examples, cu_seqlens,
                 max_seqlen)


def segment_bounds(rows, seqs, fetched, T: int):
    """``(cu_seqlens [S + 1] int32, longest segment)`` of a packed batch padded to ``T``: the
    documents of each row in order, then the row's padding tail (its own segment), over the
    flattened ``B * T`` tokens."""
    import torch

    bounds, longest, at = [0], 0, 0
    for row, seq in zip(rows, seqs):
        for i in row:
            n = len(fetched[i][0])
            at += n
            bounds.append(at)
            longest = max(longest, n)
        pad = T - len(seq)
        if pad:
            at += pad
            bounds.append(at)
            longest = max(longest, pad)
    return torch.tensor(bounds, dtype=torch.int32), longest  # [S + 1]
