"""Padding masks and packed sequences: their checks, and their two forms for the two kinds of backend.

A batch that is not one dense ``[B, H, L, D]`` block comes in one of two ways:

* a **key padding mask** ``[B, Lk]`` (True or 1 = a real token, as Hugging Face's ``attention_mask``): key
  positions are ``0..Lk-1`` and query row ``r`` sits at position ``r + Lk - Lq`` (bottom-right, as everywhere in
  the package); a query at a padding position outputs 0;
* **packed sequences** (FlashAttention's varlen form): ``q`` ``[1, H, T, D]``, ``k``/``v`` ``[1, H_kv, T, D]`` and
  ``cu_seqlens`` ``[S+1]`` = ``0, end_0, end_1, ..., T``; sequence ``s`` is rows ``[cu[s], cu[s+1])`` and attends
  only within itself.

The reference takes either as a boolean visibility ``[B, 1, Lq, Lk]`` (:func:`padding_visibility`,
:func:`packed_visibility`; the causal rule is applied on top by :func:`.reference.visibility`). The fused kernels
take sequence descriptors: an int32 tensor ``[S, 5]`` with rows ``(batch, q_start, q_end, k_start, k_end)``, each a
block of query rows and key rows of one batch element, causal bottom-right within itself
(:func:`padding_seqs`, :func:`packed_seqs`, :func:`dense_seqs`). A padding mask has that form only when each
row's real tokens are one contiguous block (left or right padding): :func:`padding_spans` checks it.
"""

from __future__ import annotations

import torch


def check_key_padding_mask(mask, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool ``[B, Lk]`` tensor (True = a real token), or a ValueError/TypeError naming the problem.

    Accepted: bool, or an integer tensor of 0s and 1s (Hugging Face's ``attention_mask``), on the device of q.
    """
    B, Lk = q.shape[0], k.shape[2]
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor of shape [batch, Lk] = [{B}, {Lk}], got "
                        f"{type(mask).__name__}")
    if mask.ndim != 2 or tuple(mask.shape) != (B, Lk):
        raise ValueError(f"key_padding_mask must have shape [batch, Lk] = [{B}, {Lk}] (q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}), got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"key_padding_mask must be bool or an integer tensor of 0/1 (True/1 = a real token), got "
                        f"{mask.dtype}; an additive float mask (0 / -inf) is not accepted")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(f"key_padding_mask of dtype {mask.dtype} must hold only 0 and 1 (1 = a real token), found "
                         f"{mask[bad].unique()[:5].tolist()}")
    return mask != 0


def check_cu_seqlens(cu, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` as an int64 tensor on q's device, or a ValueError/TypeError naming the problem."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer torch.Tensor [num_sequences + 1], got {type(cu).__name__}")
    if cu.ndim != 1:
        raise ValueError(f"cu_seqlens must be 1-D [num_sequences + 1], got shape {tuple(cu.shape)}")
    if cu.dtype == torch.bool or cu.is_floating_point() or cu.is_complex():
        raise TypeError(f"cu_seqlens must be an integer tensor (int32 or int64), got {cu.dtype}")
    if cu.device != q.device and cu.device.type != "cpu":
        raise ValueError(f"cu_seqlens is on {cu.device}; it must be on the CPU or on q's device ({q.device})")
    if q.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1: q [1, H, T, D], k/v [1, H_kv, T, D]; got "
                         f"q {tuple(q.shape)}")
    T = q.shape[2]
    if k.shape[2] != T:
        raise ValueError(f"packed sequences (cu_seqlens) need q and k of the same length T, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if cu.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least two entries (0 and T = {T}), got {cu.tolist()}")
    c = cu.to(device="cpu", dtype=torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(c[0])}")
    steps = c[1:] - c[:-1]
    if bool((steps <= 0).any()):
        s = int(torch.nonzero(steps <= 0)[0, 0])
        raise ValueError(f"cu_seqlens must be strictly increasing (every sequence at least one token), got "
                         f"cu_seqlens[{s}] = {int(c[s])} and cu_seqlens[{s + 1}] = {int(c[s + 1])}")
    if int(c[-1]) != T:
        raise ValueError(f"cu_seqlens must end at the total length T = {T} (q {tuple(q.shape)}), got "
                         f"{int(c[-1])}: the sequences must cover every row")
    return c.to(q.device)


def query_padding(mask: torch.Tensor, Lq: int) -> torch.Tensor:
    """Bool ``[B, Lq]``: whether query row r sits at a real position (``r + Lk - Lq``) of the key padding mask."""
    return mask[:, mask.shape[1] - Lq:]


def padding_visibility(mask: torch.Tensor, Lq: int) -> torch.Tensor:
    """Bool ``[B, 1, Lq, Lk]`` from a key padding mask ``[B, Lk]`` (``Lq <= Lk``): a real query row sees the real
    keys; a query at a padding position sees none (the causal rule comes on top, in the reference)."""
    return query_padding(mask, Lq)[:, None, :, None] & mask[:, None, None, :]


def packed_visibility(cu: torch.Tensor, T: int) -> torch.Tensor:
    """Bool ``[1, 1, T, T]``: row i sees key j iff both lie in the same sequence of ``cu_seqlens``."""
    seq = torch.bucketize(torch.arange(T, device=cu.device), cu[1:], right=True)  # the sequence of each row
    return (seq[:, None] == seq[None, :])[None, None]


def padding_spans(mask: torch.Tensor):
    """``(start, end, contiguous)``, each ``[B]``: the real tokens of row b are ``[start_b, end_b)`` when
    ``contiguous[b]`` (left or right padding, or no padding; an all-padding row is contiguous with start = end);
    otherwise they are not one block and ``start``/``end`` only bound them."""
    B, Lk = mask.shape
    m = mask.to(torch.int32)
    count = m.sum(dim=1)
    first = torch.argmax(m, dim=1)  # the first True (0 when there is none)
    last = Lk - 1 - torch.argmax(m.flip(1), dim=1)
    start = torch.where(count > 0, first, torch.zeros_like(first))
    end = torch.where(count > 0, last + 1, torch.zeros_like(last))
    return start, end, (count == 0) | (end - start == count)


def non_contiguous_reason(mask: torch.Tensor) -> str | None:
    """Why a key padding mask has no sequence-descriptor form (a row whose real tokens are not one block), or
    None when it has one."""
    _, _, ok = padding_spans(mask)
    if bool(ok.all()):
        return None
    b = int(torch.nonzero(~ok)[0, 0])
    real = torch.nonzero(mask[b])[:, 0].tolist()
    shown = ", ".join(map(str, real[:12])) + (", ..." if len(real) > 12 else "")
    return (f"key_padding_mask row {b} has its real tokens in more than one block (positions {shown}); the fused "
            f"kernels take one contiguous block of real tokens per row (left or right padding)")


def padding_seqs(mask: torch.Tensor, Lq: int) -> torch.Tensor:
    """The sequence descriptors ``[S, 5]`` (int32, on the mask's device) of a left/right-padded batch.

    Row b with real tokens ``[s, e)`` is ``(b, max(0, s - off), max(0, e - off), s, e)`` with ``off = Lk - Lq``;
    rows with no real query are left out (their queries output 0). Raises ValueError for a mask whose real tokens
    are not one block per row (:func:`non_contiguous_reason`).
    """
    why = non_contiguous_reason(mask)
    if why is not None:
        raise ValueError(why)
    off = mask.shape[1] - Lq
    start, end, _ = padding_spans(mask)
    b = torch.arange(mask.shape[0], device=mask.device)
    seqs = torch.stack([b, (start - off).clamp_min(0), (end - off).clamp_min(0), start, end], dim=1)
    return seqs[seqs[:, 2] > seqs[:, 1]].to(torch.int32).contiguous()


def packed_seqs(cu: torch.Tensor, device=None) -> torch.Tensor:
    """The sequence descriptors ``[S, 5]`` (int32) of packed sequences: ``(0, cu[s], cu[s+1], cu[s], cu[s+1])``."""
    lo, hi = cu[:-1], cu[1:]
    seqs = torch.stack([torch.zeros_like(lo), lo, hi, lo, hi], dim=1)
    return seqs.to(device=device if device is not None else cu.device, dtype=torch.int32).contiguous()


def dense_seqs(B: int, Lq: int, Lk: int, device=None) -> torch.Tensor:
    """The sequence descriptors of a dense batch: ``(b, 0, Lq, 0, Lk)`` for every b."""
    seqs = torch.tensor([[b, 0, Lq, 0, Lk] for b in range(B)], dtype=torch.int32)
    return seqs.to(device)


def seqs_visibility(seqs: torch.Tensor, B: int, Lq: int, Lk: int, causal: bool) -> torch.Tensor:
    """Bool ``[B, 1, Lq, Lk]``: the visibility a descriptor tensor stands for (the kernels' contract, written out;
    for tests and for the NaN policy of a descriptor call)."""
    vis = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool, device=seqs.device)
    r = torch.arange(Lq, device=seqs.device)[:, None]
    j = torch.arange(Lk, device=seqs.device)[None, :]
    for b, qs, qe, ks, ke in seqs.tolist():
        see = (r >= qs) & (r < qe) & (j >= ks) & (j < ke)
        if causal:
            see &= (j - ks) <= (r - qs) + (ke - ks) - (qe - qs)
        vis[b, 0] |= see
    return vis


__all__ = ["check_key_padding_mask", "check_cu_seqlens", "padding_visibility", "packed_visibility", "padding_spans",
           "non_contiguous_reason", "padding_seqs", "packed_seqs", "dense_seqs", "seqs_visibility", "query_padding"]
