"""Yardsticks for the kernel report: plain softmax attention (FlashAttention-2 design) in the same tiling as the
LSSA / LSSAR kernels of :mod:`.triton_kernels`.

They exist to be *compiled* and counted (``python -m freeatten_core kernel-report``): the report divides the LSSA
kernels' instructions per attention element by these kernels', so the budget "LSSA forward ≤ 1.3× softmax" is a
statement about the extra math, not about the tiling. They are also correct softmax attention (tested against
``torch`` in the interpreter, ``tests/test_kernels.py``), with the same structure as the LSSA kernels:

* one program per ``BM`` query rows (forward, dQ) or ``BN`` keys (dK/dV) of one (batch, head), causal programs
  launched heaviest first;
* the scale ``log2(e)/√d`` is folded into q once per row (scores in the log2 domain, ``exp2`` only);
* every key tile splits into *full* tiles (no mask, unmasked loads) and *edge* tiles (the causal diagonal, the end
  of the sequence), each in its own loop;
* the backward's ``D_i = dO_i·o_i`` is computed by the dQ kernel and read by the dK/dV kernel.

Shapes: q/o/do/dq ``[BH, Lq, D]``, k/v/dk/dv ``[BH, Lk, D]`` (row stride D), causal with bottom-right alignment
(query i sees keys ``j <= Lk − Lq + i``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_kernels import COMPILE_OPTIONS, _key_range, _query_range  # the same tiling as the fused kernels

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_tile(b_q, k, v, o_i, o_j, Lk, off, b_m, b_l, b_acc,
                         D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    # one key tile of the online softmax in the exp2 domain: running max m, sum l, accumulator acc
    o_d = tl.arange(0, D)
    if MASKED:
        m_j = o_j < Lk
        b_kt = tl.load(k + o_j[None, :] * D + o_d[:, None], mask=m_j[None, :], other=0.0)  # [D, BN]
        b_v = tl.load(v + o_j[:, None] * D + o_d[None, :], mask=m_j[:, None], other=0.0)  # [BN, D]
        vis = m_j[None, :]
        if CAUSAL:
            vis = vis & (o_j[None, :] <= off + o_i[:, None])
        b_t = tl.where(vis, tl.dot(b_q, b_kt), float("-inf"))
    else:
        b_kt = tl.load(k + o_j[None, :] * D + o_d[:, None])  # [D, BN]
        b_v = tl.load(v + o_j[:, None] * D + o_d[None, :])  # [BN, D]
        b_t = tl.dot(b_q, b_kt)  # [BM, BN]
    b_mn = tl.maximum(b_m, tl.max(b_t, 1))
    b_p = tl.math.exp2(b_t - b_mn[:, None])
    b_alpha = tl.math.exp2(b_m - b_mn)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(v.dtype.element_ty), b_v)
    return b_mn, b_l, b_acc


@triton.jit
def softmax_fwd_kernel(
    q, k, v, o, lse, Lq, Lk, off, scale2,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
):
    # o = softmax(q·kᵀ/√d)·v; lse [BH, Lq] = log2 Σ_j 2^(t_ij) with t = q·k·scale2 (scale2 = log2(e)/√d)
    n_m = tl.num_programs(0)
    i_m, i_bh = n_m - 1 - tl.program_id(0), tl.program_id(1).to(tl.int64)  # heaviest (last) row tiles first
    o_i = i_m * BM + tl.arange(0, BM)  # [BM]
    o_d = tl.arange(0, D)
    m_i = o_i < Lq
    p_q = i_bh * Lq * D + o_i[:, None] * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_i[:, None], other=0.0)
    b_q = (b_q.to(tl.float32) * scale2).to(q.dtype.element_ty)  # [BM, D] scale folded in once per row
    k += i_bh * Lk * D
    v += i_bh * Lk * D
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    n_full, hi = _key_range(i_m * BM, BM, BN, Lk, off, CAUSAL)
    for j0 in range(0, n_full, BN):  # full tiles: no mask
        b_m, b_l, b_acc = _online_softmax_tile(b_q, k, v, o_i, j0 + tl.arange(0, BN), Lk, off, b_m, b_l, b_acc,
                                               D, CAUSAL, False)
    for j0 in range(n_full, hi, BN):  # edge tiles: the causal diagonal and the end of the keys
        b_m, b_l, b_acc = _online_softmax_tile(b_q, k, v, o_i, j0 + tl.arange(0, BN), Lk, off, b_m, b_l, b_acc,
                                               D, CAUSAL, True)
    b_o = b_acc / b_l[:, None]
    tl.store(o + p_q, b_o.to(o.dtype.element_ty), mask=m_i[:, None])
    tl.store(lse + i_bh * Lq + o_i, b_m + tl.math.log2(b_l), mask=m_i)


@triton.jit
def softmax_bwd_dq_kernel(
    q, k, v, o, do, lse, dq, delta, Lq, Lk, off, scale2, sm_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
):
    # dq_i = sm_scale Σ_j P_ij (dP_ij − D_i) k_j; also writes D_i = dO_i·o_i for the dK/dV kernel
    n_m = tl.num_programs(0)
    i_m, i_bh = n_m - 1 - tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_i = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_i = o_i < Lq
    p_q = i_bh * Lq * D + o_i[:, None] * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_i[:, None], other=0.0)
    b_q = (b_q.to(tl.float32) * scale2).to(q.dtype.element_ty)
    b_do = tl.load(do + p_q, mask=m_i[:, None], other=0.0)
    b_delta = tl.sum(b_do.to(tl.float32) * tl.load(o + p_q, mask=m_i[:, None], other=0.0).to(tl.float32), 1)
    b_lse = tl.load(lse + i_bh * Lq + o_i, mask=m_i, other=0.0)
    k += i_bh * Lk * D
    v += i_bh * Lk * D
    b_dq = tl.zeros([BM, D], dtype=tl.float32)
    n_full, hi = _key_range(i_m * BM, BM, BN, Lk, off, CAUSAL)
    for j0 in range(0, n_full, BN):
        o_j = j0 + tl.arange(0, BN)
        b_kt = tl.load(k + o_j[None, :] * D + o_d[:, None])  # [D, BN]
        b_vt = tl.load(v + o_j[None, :] * D + o_d[:, None])  # [D, BN]
        b_p = tl.math.exp2(tl.dot(b_q, b_kt) - b_lse[:, None])  # [BM, BN]
        b_ds = b_p * (tl.dot(b_do, b_vt) - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(k.dtype.element_ty), tl.trans(b_kt))
    for j0 in range(n_full, hi, BN):
        o_j = j0 + tl.arange(0, BN)
        m_j = o_j < Lk
        b_kt = tl.load(k + o_j[None, :] * D + o_d[:, None], mask=m_j[None, :], other=0.0)
        b_vt = tl.load(v + o_j[None, :] * D + o_d[:, None], mask=m_j[None, :], other=0.0)
        vis = m_j[None, :]
        if CAUSAL:
            vis = vis & (o_j[None, :] <= off + o_i[:, None])
        b_p = tl.math.exp2(tl.where(vis, tl.dot(b_q, b_kt), float("-inf")) - b_lse[:, None])
        b_ds = b_p * (tl.dot(b_do, b_vt) - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(k.dtype.element_ty), tl.trans(b_kt))
    tl.store(dq + p_q, (b_dq * sm_scale).to(dq.dtype.element_ty), mask=m_i[:, None])
    tl.store(delta + i_bh * Lq + o_i, b_delta, mask=m_i)


@triton.jit
def softmax_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, Lq, Lk, off, scale2, sm_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
):
    # one program: BN keys; loops over the query tiles that see them, in the transposed orientation [BN, BM]
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # causal: the first key tiles are the heaviest
    o_j = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_j = o_j < Lk
    p_k = i_bh * Lk * D + o_j[:, None] * D + o_d[None, :]
    b_k = tl.load(k + p_k, mask=m_j[:, None], other=0.0)
    b_k = (b_k.to(tl.float32) * scale2).to(k.dtype.element_ty)  # [BN, D]
    b_v = tl.load(v + p_k, mask=m_j[:, None], other=0.0)
    q += i_bh * Lq * D
    do += i_bh * Lq * D
    lse += i_bh * Lq
    delta += i_bh * Lq
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    lo, mid = _query_range(i_n * BN, BM, BN, Lq, Lk, off, CAUSAL)
    for i0 in range(lo, mid, BM):
        o_i = i0 + tl.arange(0, BM)
        m_i = o_i < Lq
        p_t = o_i[None, :] * D + o_d[:, None]
        b_qt = tl.load(q + p_t, mask=m_i[None, :], other=0.0)  # [D, BM]
        b_dot = tl.load(do + p_t, mask=m_i[None, :], other=0.0)  # [D, BM]
        b_lse = tl.load(lse + o_i, mask=m_i, other=0.0)
        b_delta = tl.load(delta + o_i, mask=m_i, other=0.0)
        vis = m_j[:, None] & m_i[None, :]
        if CAUSAL:
            vis = vis & (o_j[:, None] <= off + o_i[None, :])
        b_pt = tl.math.exp2(tl.where(vis, tl.dot(b_k, b_qt), float("-inf")) - b_lse[None, :])  # [BN, BM]
        b_dv += tl.dot(b_pt.to(do.dtype.element_ty), tl.trans(b_dot))
        b_dst = b_pt * (tl.dot(b_v, b_dot) - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(q.dtype.element_ty), tl.trans(b_qt))
    for i0 in range(mid, Lq, BM):
        o_i = i0 + tl.arange(0, BM)
        m_i = o_i < Lq  # only the last query tile is partial; its rows past Lq load q = dO = 0, lse = δ = 0: P = 1
        # there, but P·dO = 0 and P·(dP − δ) = 0 (zero-filled loads need no select; lse = +inf needed one)
        p_t = o_i[None, :] * D + o_d[:, None]
        b_qt = tl.load(q + p_t, mask=m_i[None, :], other=0.0)
        b_dot = tl.load(do + p_t, mask=m_i[None, :], other=0.0)
        b_lse = tl.load(lse + o_i, mask=m_i, other=0.0)
        b_delta = tl.load(delta + o_i, mask=m_i, other=0.0)
        b_pt = tl.math.exp2(tl.dot(b_k, b_qt) - b_lse[None, :])
        b_dv += tl.dot(b_pt.to(do.dtype.element_ty), tl.trans(b_dot))
        b_dst = b_pt * (tl.dot(b_v, b_dot) - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(q.dtype.element_ty), tl.trans(b_qt))
    tl.store(dk + p_k, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_j[:, None])
    tl.store(dv + p_k, b_dv.to(dv.dtype.element_ty), mask=m_j[:, None])


@triton.jit
def _softmax_bwd_tile(b_k, b_v, q, do, lse, delta, dq, o_i, o_j, Lq, Lk, off, b_dk, b_dv,
                      D: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    # one [BN, BM] tile of the one-pass backward: dv, dk as the dK/dV kernel, and dqᵀ += kᵀ·dS with float32
    # atomics (dq in units of the scaled keys: the host multiplies by 1/log2(e))
    o_d = tl.arange(0, D)
    m_i = o_i < Lq
    p_t = o_i[None, :] * D + o_d[:, None]
    b_qt = tl.load(q + p_t, mask=m_i[None, :], other=0.0)  # [D, BM]
    b_dot = tl.load(do + p_t, mask=m_i[None, :], other=0.0)  # [D, BM]
    b_lse = tl.load(lse + o_i, mask=m_i, other=0.0)
    b_delta = tl.load(delta + o_i, mask=m_i, other=0.0)
    b_st = tl.dot(b_k, b_qt)
    if MASKED:
        vis = (o_j < Lk)[:, None] & m_i[None, :]
        if CAUSAL:
            vis = vis & (o_j[:, None] <= off + o_i[None, :])
        b_st = tl.where(vis, b_st, float("-inf"))
    b_pt = tl.math.exp2(b_st - b_lse[None, :])  # [BN, BM]
    b_dv += tl.dot(b_pt.to(do.dtype.element_ty), tl.trans(b_dot))
    b_dst = (b_pt * (tl.dot(b_v, b_dot) - b_delta[None, :])).to(q.dtype.element_ty)
    b_dk += tl.dot(b_dst, tl.trans(b_qt))
    tl.atomic_add(dq + p_t, tl.dot(tl.trans(b_k), b_dst), mask=m_i[None, :], sem="relaxed")
    return b_dk, b_dv


@triton.jit
def softmax_bwd_kernel(
    q, k, v, do, lse, delta, dq, dk, dv, Lq, Lk, off, scale2, sm_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
):
    # the one-pass backward (FlashAttention-2's design): the dK/dV kernel with dq accumulated through atomics
    # (float32, zero on entry); delta [BH, Lq] = D_i computed beforehand
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_j = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_j = o_j < Lk
    p_k = i_bh * Lk * D + o_j[:, None] * D + o_d[None, :]
    b_k = tl.load(k + p_k, mask=m_j[:, None], other=0.0)
    b_k = (b_k.to(tl.float32) * scale2).to(k.dtype.element_ty)  # [BN, D]
    b_v = tl.load(v + p_k, mask=m_j[:, None], other=0.0)
    q += i_bh * Lq * D
    do += i_bh * Lq * D
    dq += i_bh * Lq * D
    lse += i_bh * Lq
    delta += i_bh * Lq
    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    lo, mid = _query_range(i_n * BN, BM, BN, Lq, Lk, off, CAUSAL)
    for i0 in range(lo, mid, BM):
        b_dk, b_dv = _softmax_bwd_tile(b_k, b_v, q, do, lse, delta, dq, i0 + tl.arange(0, BM), o_j, Lq, Lk, off,
                                       b_dk, b_dv, D, CAUSAL, True)
    for i0 in range(mid, Lq, BM):
        b_dk, b_dv = _softmax_bwd_tile(b_k, b_v, q, do, lse, delta, dq, i0 + tl.arange(0, BM), o_j, Lq, Lk, off,
                                       b_dk, b_dv, D, CAUSAL, False)
    tl.store(dk + p_k, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_j[:, None])
    tl.store(dv + p_k, b_dv.to(dv.dtype.element_ty), mask=m_j[:, None])


TILES = dict(fwd=(128, 64, 8, 3), dq=(128, 64, 8, 3), dkdv=(128, 64, 8, 3))
"""(BM, BN, num_warps, num_stages) per kernel kind; the report compiles the LSSA kernels with the same."""


def softmax_attention(q, k, v, causal: bool, do=None, tiles=None):
    """Softmax attention through the yardstick kernels: o, and when ``do`` is given (dq, dk, dv) of the two-kernel
    backward followed by (dq, dk, dv) of the one-pass backward.

    q [B, H, Lq, D], k/v [B, H, Lk, D] (contiguous), causal with bottom-right alignment. ``tiles`` overrides
    (BM, BN) (the interpreter's cost grows with the number of tiles). Outputs in the input dtype.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    bm, bn = tiles or TILES["fwd"][:2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty((B * H, Lq), device=q.device, dtype=torch.float32)
    scale2 = LOG2E / math.sqrt(D)
    off = Lk - Lq
    softmax_fwd_kernel[(triton.cdiv(Lq, bm), B * H)](q, k, v, o, lse, Lq, Lk, off, scale2, D=D, BM=bm, BN=bn,
                                                     CAUSAL=causal, **COMPILE_OPTIONS)
    if do is None:
        return o
    do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    sm_scale = 1.0 / math.sqrt(D)
    softmax_bwd_dq_kernel[(triton.cdiv(Lq, bm), B * H)](q, k, v, o, do, lse, dq, delta, Lq, Lk, off, scale2,
                                                        sm_scale, D=D, BM=bm, BN=bn, CAUSAL=causal, **COMPILE_OPTIONS)
    softmax_bwd_dkdv_kernel[(triton.cdiv(Lk, bn), B * H)](q, k, v, do, lse, delta, dk, dv, Lq, Lk, off, scale2,
                                                          sm_scale, D=D, BM=bm, BN=bn, CAUSAL=causal, **COMPILE_OPTIONS)
    # the one-pass backward, from the same D_i
    dq1 = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk1, dv1 = torch.empty_like(k), torch.empty_like(v)
    softmax_bwd_kernel[(triton.cdiv(Lk, bn), B * H)](q, k, v, do, lse, delta, dq1, dk1, dv1, Lq, Lk, off, scale2,
                                                     sm_scale, D=D, BM=bm, BN=bn, CAUSAL=causal, **COMPILE_OPTIONS)
    return o, dq, dk, dv, (dq1 / LOG2E).to(q.dtype), dk1, dv1


def report_cases(D: int, dtype: str, causal: bool, tiles: dict | None = None) -> list[dict]:
    """The yardsticks as kernel-report cases (see :mod:`freeatten_core.kernel_report`), compiled in ``tiles``
    (kind -> (BM, BN, num_warps, num_stages); default :data:`TILES`), i.e. the LSSA kernels' tiles."""
    tiles = tiles or TILES
    dt = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    p, i32, f32 = "*" + dt, "i32", "fp32"
    sigs = {
        "fwd": ("softmax_fwd", "softmax_fwd_kernel",
                dict(q=p, k=p, v=p, o=p, lse="*fp32", Lq=i32, Lk=i32, off=i32, scale2=f32)),
        "dq": ("softmax_dq", "softmax_bwd_dq_kernel",
               dict(q=p, k=p, v=p, o=p, do=p, lse="*fp32", dq=p, delta="*fp32", Lq=i32, Lk=i32, off=i32,
                    scale2=f32, sm_scale=f32)),
        "dkdv": ("softmax_dkdv", "softmax_bwd_dkdv_kernel",
                 dict(q=p, k=p, v=p, do=p, lse="*fp32", delta="*fp32", dk=p, dv=p, Lq=i32, Lk=i32, off=i32,
                      scale2=f32, sm_scale=f32)),
        "bwd": ("softmax_bwd", "softmax_bwd_kernel",
                dict(q=p, k=p, v=p, do=p, lse="*fp32", delta="*fp32", dq="*fp32", dk=p, dv=p, Lq=i32, Lk=i32,
                     off=i32, scale2=f32, sm_scale=f32)),
    }
    out = []
    for kind, (name, kernel, sig) in sigs.items():
        bm, bn, w, st = tiles[kind if kind in tiles else "dkdv"]
        out.append(dict(name=name, module=__name__, kernel=kernel, signature=sig, BM=bm, BN=bn, num_warps=w,
                        num_stages=st, constexprs=dict(D=D, BM=bm, BN=bn, CAUSAL=causal),
                        loops=["edge", "full"] if kind in ("dkdv", "bwd") else ["full", "edge"], D=D, dtype=dtype,
                        causal=causal, budget_of=name))
    return out
