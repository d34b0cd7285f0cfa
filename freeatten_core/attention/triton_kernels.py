"""Fused Triton kernels for LSSA / LSSAR (forward and backward); no ``[Lq, Lk]`` tensor is ever formed.

Contract with :mod:`freeatten_core.attention.api`:
  unsupported_reason(q, k, v, explicit) -> str | None   why the kernels cannot run this call (None: they can).
      ``explicit`` is True for backend="triton"; "auto" (explicit=False) only picks the kernels on CUDA.
  attention(q, k, v, method, causal, p=15.0, offset_rows=3) -> Tensor   differentiable, input dtype out.
Importing this module raises ImportError when triton is missing: the API then falls back / explains.

The math is ``shared/spec/kernel-math.md``; the plain-PyTorch specification is :mod:`.reference`. Per query row
``i`` (0-based) with ``N_i`` visible keys, ``c_i = ln(d)·ln(N_i)``, unit vectors ``q̂``, ``k̂``:

* forward LSSA (one pass over the keys): ``f = softplus(c·q̂·k̂)``, ``acc += f·V``, ``Z += Σf``, ``o = acc/Z``.
* forward LSSAR (two passes): pass 1 gives ``Z_i`` and ``F_i = max_j f_ij``, hence the row maximum
  ``M_i = N_i F_i/Z_i − O_i`` of ``x = N·f/Z − O``. Pass 2 forms the max-normalised power
  ``u = (ReLU(x)/M)^p ∈ [0, 1]`` -- which cannot overflow for any p -- as ``y = a_i f − b_i`` (one FMA, with
  ``a_i = N_i/(N_i F_i − O_i Z_i)``, ``b_i = O_i Z_i/(N_i F_i − O_i Z_i)``) and ``u = ReLU(y)^p`` (integer p by
  square-and-multiply on the FMA units, other p by exp2/log2); ``o = Σ u·V / Σ u``. A row with ``M_i ≤ 0``
  (exactly uniform) keeps its LSSA weights, as :func:`.reference.reweight` does.
* backward: the dQ kernel also computes the preprocess term ``D_i = dO_i·o_i`` and the row term ``R_i``
  (``R_i = O_i G_i / Z_i`` of kernel-math.md) from the sums it accumulates anyway; the dK/dV kernel reads both.

Design choices:
* The unit-sphere normalisation of q and k runs in PyTorch (float32, autograd) around the kernel: it is an
  O(L·d) memory-bound op next to O(L²·d) work, and keeping it outside keeps the kernels free of norm
  recomputation per reloaded tile. (Decided by argument, not yet by a GPU measurement.) The float32 unit
  vectors are handed to the kernels as float16 for half-precision inputs (components lie in [-1, 1], where
  float16 has 8× the precision of bfloat16 and no range issue) and stay float32 for float32 inputs. This
  matters because c_i ≈ 30–40 multiplies every error of q̂·k̂ and p = 15 sharpens it again: measured in float64
  at L = 1024, rounding q̂, k̂ to bfloat16 costs LSSAR 1e-2 relative error in dq/dk, to float16 1.4e-3.
* The output is written in float32 too (and cast to the input dtype outside): the backward's D_i = dO_i·o_i
  from a bfloat16 o costs LSSAR 2e-2 relative error in the gradients (p amplifies the error of D_i).
* Every load is cast to float32 right after ``tl.load``; matmul operands are cast back to a low-precision type
  just before ``tl.dot`` only on a GPU with half-precision inputs: q̂·k̂ in float16, products with V / dO in
  the input dtype, products with dS in bfloat16 (its range is unbounded). float32 inputs use exact ("ieee")
  float32 dots. The interpreter always computes in float32.
* Only tiles that cross the causal diagonal or the end of a sequence are masked (a uniform runtime branch);
  tile sizes are autotuned on the GPU among candidates checked offline for register spills (``_launch``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether triton runs kernels in its interpreter (read once, at import, as triton itself does)."""

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_INT_P = 64  # integer p up to this is formed by repeated multiplication; larger or fractional p by exp2/log2

# dot-operand codes (constexpr): 0 exact float32, 1 float16, 2 bfloat16, 3 bfloat16 rounding emulated in
# float32 (the interpreter's bfloat16 arithmetic is unreliable; see emulate_gpu_dots)
_DT_F32, _DT_F16, _DT_BF16, _DT_BF16_EMU = 0, 1, 2, 3

# --------------------------------------------------------------------------------------------------------
# A test hook: allocate every kernel output filled with NaN, so a position the kernel forgets to write shows.
# --------------------------------------------------------------------------------------------------------
_POISON = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within this context every output buffer of the kernels is allocated filled with NaN."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


_EMULATE_GPU_DOTS = False


@contextlib.contextmanager
def emulate_gpu_dots(enabled: bool = True):
    """Test hook: in the interpreter, round every matmul operand as the GPU path does for half-precision inputs
    (q̂·k̂ in float16, V/dO products in the input dtype, dS products in bfloat16; bfloat16 rounding emulated
    bit-exactly in float32), so the CPU tests check the GPU's operand precision."""
    global _EMULATE_GPU_DOTS
    old, _EMULATE_GPU_DOTS = _EMULATE_GPU_DOTS, enabled
    try:
        yield
    finally:
        _EMULATE_GPU_DOTS = old


def _new(shape, dtype, device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _round_bf16(x):
    # x rounded to the nearest bfloat16 (ties to even), kept in float32: bit arithmetic, exact in the interpreter
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    # a @ b with float32 accumulation; operands cast to the low-precision type DT just before the tensor cores
    if DT == 1:
        r = tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DT == 2:
        r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DT == 3:
        r = tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
    else:
        r = tl.dot(a, b, input_precision="ieee")
    return r


@triton.jit
def _softplus_sigmoid(s):
    # softplus(s) = max(s, 0) + log1p(e), e = exp(-|s|) ∈ (0, 1], and σ(s) from the same e.
    # log1p without a division (the special-function units are the scarce resource: softplus already costs
    # one exp and one log per element): six terms of its series where e < 1/8, where 1 + e has lost e's low
    # bits, log(1 + e) elsewhere; max relative error of f 6.3e-7 over all s. A plain log(1 + e) would give
    # f = 0 for s < -17, hence Z = 0 for a row whose keys all point away from the query.
    e = tl.exp(-tl.abs(s))
    u = 1.0 + e
    ser = e * (1.0 + e * (-0.5 + e * (0.33333334 + e * (-0.25 + e * (0.2 + e * -0.16666667)))))
    f = tl.maximum(s, 0.0) + tl.where(e < 0.125, ser, tl.log(u))
    sig = tl.where(s >= 0, 1.0, e) / u
    return f, sig


@triton.jit
def _tile_is_partial(j0, BN: tl.constexpr, Lk, off, m0, CAUSAL: tl.constexpr):
    # whether keys [j0, j0 + BN) need a mask for the query rows from m0 on: the tile runs past Lk, or (causal)
    # past the diagonal of row m0 (query i sees keys j <= off + i). Most tiles are full and skip the masking.
    if CAUSAL:
        r = (j0 + BN > Lk) | (j0 + BN - 1 > off + m0)
    else:
        r = j0 + BN > Lk
    return r


@triton.jit
def _visible(o_i, o_j, Lk, off, CAUSAL: tl.constexpr):
    # [BM, BN] mask of the keys o_j that query rows o_i see
    vis = (o_j < Lk)[None, :] & (o_i >= 0)[:, None]
    if CAUSAL:
        vis = vis & (o_j[None, :] <= off + o_i[:, None])
    return vis


@triton.jit
def _pow(y, P, P_INT: tl.constexpr):
    # y**P for y >= 0. P_INT >= 0: the integer exponent by square-and-multiply (p = 15: y², y⁴, y⁸ and three
    # products, all on the FMA units); P_INT < 0: the general power exp2(P·log2 y), 0 where y = 0.
    if P_INT >= 0:
        r = tl.zeros_like(y) + 1.0
        b = y
        for bit in tl.static_range(7):
            if (P_INT >> bit) & 1:
                r = r * b
            if (P_INT >> (bit + 1)) > 0:
                b = b * b
    else:
        r = tl.where(y > 0, tl.exp2(P * tl.log2(tl.maximum(y, 1e-30))), 0.0)
    return r


# --------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------


@triton.jit
def lssa_fwd_kernel(
    q, k, v, c, o, stats,
    Lq, Lk, off, offset_rows, P, n_rows,
    s_qbh, s_ql, s_kbh, s_kl,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, P_INT: tl.constexpr,
    QK_DT: tl.constexpr, PV_DT: tl.constexpr,
):
    # one program: BM query rows of one (batch, head); q/o [BH, Lq, D], k/v [BH, Lk, D], c [Lq],
    # stats [4, BH, Lq] = (Z, a, b, U) per row for the backward pass (n_rows = BH·Lq).
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: B·H·L·D may pass 2^31
    o_i = i_m * BM + tl.arange(0, BM)  # [BM] query rows
    o_d = tl.arange(0, D)  # [D]
    m_i = o_i < Lq

    b_q = tl.load(q + i_bh * s_qbh + o_i[:, None] * s_ql + o_d[None, :], mask=m_i[:, None], other=0.0)
    b_q = b_q.to(tl.float32)  # [BM, D]
    b_c = tl.load(c + o_i, mask=m_i, other=0.0)  # [BM]
    if CAUSAL:
        b_N = (off + o_i + 1).to(tl.float32)  # bottom-right alignment: row i sees keys j <= off + i
        hi = tl.minimum(Lk, off + (i_m + 1) * BM)
    else:
        b_N = tl.zeros([BM], dtype=tl.float32) + Lk
        hi = Lk
    b_O = tl.where(b_N > offset_rows, 1.0, 0.0)  # [BM]

    b_Z = tl.zeros([BM], dtype=tl.float32)
    b_F = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    # pass 1 (LSSA: the only pass): Z = Σ f (and F = max f for LSSAR, or acc = Σ f·v for LSSA)
    for j0 in range(0, hi, BN):
        o_j = j0 + tl.arange(0, BN)  # [BN]
        m_j = o_j < Lk
        b_kt = tl.load(k + i_bh * s_kbh + o_j[None, :] * s_kl + o_d[:, None], mask=m_j[None, :], other=0.0)
        b_s = _dot(b_q, b_kt.to(tl.float32), QK_DT) * b_c[:, None]  # [BM, BN]
        b_f, _ = _softplus_sigmoid(b_s)
        if _tile_is_partial(j0, BN, Lk, off, i_m * BM, CAUSAL):  # only tiles on the diagonal / at the end
            b_f = tl.where(_visible(o_i, o_j, Lk, off, CAUSAL), b_f, 0.0)
        b_Z += tl.sum(b_f, 1)
        if REWEIGHT:
            b_F = tl.maximum(b_F, tl.max(b_f, 1))
        else:
            b_v = tl.load(v + i_bh * s_kbh + o_j[:, None] * s_kl + o_d[None, :], mask=m_j[:, None], other=0.0)
            b_acc += _dot(b_f, b_v.to(tl.float32), PV_DT)  # [BM, D]

    if REWEIGHT:
        # M = N·F/Z − O; y = x/M = a·f − b. Rows with M <= 0 (exactly uniform) keep the LSSA weights.
        b_den = b_N * b_F - b_O * b_Z
        ok = b_den > 0
        b_a = tl.where(ok, b_N / tl.where(ok, b_den, 1.0), 0.0)
        b_b = tl.where(ok, b_O * b_Z / tl.where(ok, b_den, 1.0), 0.0)
        b_U = tl.zeros([BM], dtype=tl.float32)
        # pass 2: u = ReLU(y)^p ∈ [0, 1], acc = Σ u·v, U = Σ u
        for j0 in range(0, hi, BN):
            o_j = j0 + tl.arange(0, BN)
            m_j = o_j < Lk
            b_kt = tl.load(k + i_bh * s_kbh + o_j[None, :] * s_kl + o_d[:, None], mask=m_j[None, :], other=0.0)
            b_v = tl.load(v + i_bh * s_kbh + o_j[:, None] * s_kl + o_d[None, :], mask=m_j[:, None], other=0.0)
            b_s = _dot(b_q, b_kt.to(tl.float32), QK_DT) * b_c[:, None]  # [BM, BN]
            b_f, _ = _softplus_sigmoid(b_s)
            if _tile_is_partial(j0, BN, Lk, off, i_m * BM, CAUSAL):
                b_f = tl.where(_visible(o_i, o_j, Lk, off, CAUSAL), b_f, 0.0)
            # f = 0 at invisible keys gives y = 0 there (b >= 0), so u = 0: no further masking needed
            b_y = tl.maximum(b_a[:, None] * b_f - b_b[:, None], 0.0)
            b_u = tl.where(ok[:, None], _pow(b_y, P, P_INT), b_f)  # [BM, BN]
            b_U += tl.sum(b_u, 1)
            b_acc += _dot(b_u, b_v.to(tl.float32), PV_DT)
    else:
        b_a = tl.zeros([BM], dtype=tl.float32)
        b_b = tl.zeros([BM], dtype=tl.float32)
        b_U = b_Z

    b_o = b_acc / tl.where(m_i, b_U, 1.0)[:, None]
    tl.store(o + i_bh * s_qbh + o_i[:, None] * s_ql + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_i[:, None])
    p_st = stats + i_bh * Lq + o_i
    tl.store(p_st, b_Z, mask=m_i)
    tl.store(p_st + n_rows, b_a, mask=m_i)
    tl.store(p_st + 2 * n_rows, b_b, mask=m_i)
    tl.store(p_st + 3 * n_rows, b_U, mask=m_i)


# --------------------------------------------------------------------------------------------------------
# Backward. Per visible (i, j), with y = a_i f − b_i, u = y^p, P = u/U (LSSA and uniform rows: P = f/Z):
#   dP = dO_i·v_j,  D_i = dO_i·o_i,
#   t_ij = N_i dx_ij / Z_i = (p·a_i/U_i)·y^(p−1)·(dP − D_i)   (y > 0, else 0; LSSA rows: (dP − D_i)/Z_i),
#   R_i  = O_i/N_i · Σ_j t_ij   (= O_i G_i / Z_i; 0 for LSSA rows),   dS_ij = (t_ij − R_i)·σ(s_ij),
#   dq̂_i = c_i Σ_j dS_ij k̂_j,  dk̂_j = Σ_i c_i dS_ij q̂_i,  dv_j = Σ_i P_ij dO_i.
# R_i needs the whole row first, so the dQ kernel accumulates Σ t σ k̂, Σ σ k̂ and Σ t side by side and combines
# them at the end: dq̂_i = c_i (Σ_j t_ij σ_ij k̂_j − R_i Σ_j σ_ij k̂_j). It writes D_i and R_i for the dK/dV kernel.
# --------------------------------------------------------------------------------------------------------


@triton.jit
def lssa_bwd_dq_kernel(
    q, k, v, c, o, do, stats, dq, delta, rterm,
    Lq, Lk, off, offset_rows, P, n_rows,
    s_qbh, s_ql, s_kbh, s_kl,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, PM1_INT: tl.constexpr,
    QK_DT: tl.constexpr, PV_DT: tl.constexpr, DS_DT: tl.constexpr,
):
    # q/o/do/dq [BH, Lq, D], k/v [BH, Lk, D]; delta, rterm [BH, Lq]
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: B·H·L·D may pass 2^31
    o_i = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_i = o_i < Lq
    p_rows = i_bh * s_qbh + o_i[:, None] * s_ql + o_d[None, :]

    b_q = tl.load(q + p_rows, mask=m_i[:, None], other=0.0).to(tl.float32)  # [BM, D]
    b_do = tl.load(do + p_rows, mask=m_i[:, None], other=0.0).to(tl.float32)  # [BM, D]
    b_o = tl.load(o + p_rows, mask=m_i[:, None], other=0.0).to(tl.float32)  # [BM, D]
    b_delta = tl.sum(b_do * b_o, 1)  # [BM] the preprocess term D_i = dO_i·o_i
    b_c = tl.load(c + o_i, mask=m_i, other=0.0)
    p_st = stats + i_bh * Lq + o_i
    b_Z = tl.load(p_st, mask=m_i, other=1.0)
    b_a = tl.load(p_st + n_rows, mask=m_i, other=0.0)
    b_b = tl.load(p_st + 2 * n_rows, mask=m_i, other=0.0)
    b_U = tl.load(p_st + 3 * n_rows, mask=m_i, other=1.0)
    ok = b_a > 0  # LSSAR row (else LSSA weights)
    b_pa = P * b_a / b_U
    b_iz = 1.0 / b_Z
    if CAUSAL:
        b_N = (off + o_i + 1).to(tl.float32)
        hi = tl.minimum(Lk, off + (i_m + 1) * BM)
    else:
        b_N = tl.zeros([BM], dtype=tl.float32) + Lk
        hi = Lk

    b_acc1 = tl.zeros([BM, D], dtype=tl.float32)  # Σ_j t σ k̂
    b_acc2 = tl.zeros([BM, D], dtype=tl.float32)  # Σ_j σ k̂   (LSSAR only)
    b_H = tl.zeros([BM], dtype=tl.float32)  # Σ_j t
    for j0 in range(0, hi, BN):
        o_j = j0 + tl.arange(0, BN)
        m_j = o_j < Lk
        p_t = i_bh * s_kbh + o_j[None, :] * s_kl + o_d[:, None]
        b_kt = tl.load(k + p_t, mask=m_j[None, :], other=0.0).to(tl.float32)  # [D, BN]
        b_vt = tl.load(v + p_t, mask=m_j[None, :], other=0.0).to(tl.float32)  # [D, BN]
        b_s = _dot(b_q, b_kt, QK_DT) * b_c[:, None]  # [BM, BN]
        b_f, b_sig = _softplus_sigmoid(b_s)
        b_dp = _dot(b_do, b_vt, PV_DT) - b_delta[:, None]  # [BM, BN] dP − D
        if _tile_is_partial(j0, BN, Lk, off, i_m * BM, CAUSAL):
            # zero f, σ and dP − D at invisible keys; then y = 0 and t = 0 there too
            vis = _visible(o_i, o_j, Lk, off, CAUSAL)
            b_f = tl.where(vis, b_f, 0.0)
            b_sig = tl.where(vis, b_sig, 0.0)
            b_dp = tl.where(vis, b_dp, 0.0)
        if REWEIGHT:
            b_y = tl.maximum(b_a[:, None] * b_f - b_b[:, None], 0.0)
            b_g = _pow(b_y, P - 1.0, PM1_INT)
            b_t = tl.where(ok[:, None], tl.where(b_y > 0, b_pa[:, None] * b_g * b_dp, 0.0), b_dp * b_iz[:, None])
            b_acc2 += _dot(b_sig, tl.trans(b_kt), DS_DT)
        else:
            b_t = b_dp * b_iz[:, None]
        b_H += tl.sum(b_t, 1)
        b_acc1 += _dot(b_t * b_sig, tl.trans(b_kt), DS_DT)

    if REWEIGHT:
        b_R = tl.where(ok, b_H * tl.where(b_N > offset_rows, 1.0, 0.0) / b_N, 0.0)  # [BM]
        b_dq = b_c[:, None] * (b_acc1 - b_R[:, None] * b_acc2)
    else:
        b_R = tl.zeros([BM], dtype=tl.float32)
        b_dq = b_c[:, None] * b_acc1
    tl.store(dq + p_rows, b_dq.to(dq.dtype.element_ty), mask=m_i[:, None])
    tl.store(delta + i_bh * Lq + o_i, b_delta, mask=m_i)
    tl.store(rterm + i_bh * Lq + o_i, b_R, mask=m_i)


@triton.jit
def lssa_bwd_dkdv_kernel(
    q, k, v, c, do, stats, delta, rterm, dk, dv,
    Lq, Lk, off, P, n_rows,
    s_qbh, s_ql, s_kbh, s_kl,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, PM1_INT: tl.constexpr,
    QK_DT: tl.constexpr, PV_DT: tl.constexpr, DS_DT: tl.constexpr,
):
    # one program: BN keys of one (batch, head), looping over the query tiles that see them.
    # Works in the transposed orientation [BN, BM] so that both accumulations are plain row-major dots.
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_j = i_n * BN + tl.arange(0, BN)  # [BN] keys
    o_d = tl.arange(0, D)
    m_j = o_j < Lk
    p_cols = i_bh * s_kbh + o_j[:, None] * s_kl + o_d[None, :]
    b_k = tl.load(k + p_cols, mask=m_j[:, None], other=0.0).to(tl.float32)  # [BN, D]
    b_v = tl.load(v + p_cols, mask=m_j[:, None], other=0.0).to(tl.float32)  # [BN, D]

    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    if CAUSAL:
        lo = (tl.maximum(i_n * BN - off, 0) // BM) * BM  # first query tile that sees key i_n·BN
    else:
        lo = 0
    for i0 in range(lo, Lq, BM):
        o_i = i0 + tl.arange(0, BM)  # [BM]
        m_i = o_i < Lq
        p_t = i_bh * s_qbh + o_i[None, :] * s_ql + o_d[:, None]
        b_qt = tl.load(q + p_t, mask=m_i[None, :], other=0.0).to(tl.float32)  # [D, BM]
        b_dot = tl.load(do + p_t, mask=m_i[None, :], other=0.0).to(tl.float32)  # [D, BM]
        b_c = tl.load(c + o_i, mask=m_i, other=0.0)  # [BM]
        p_st = stats + i_bh * Lq + o_i
        b_Z = tl.load(p_st, mask=m_i, other=1.0)
        b_U = tl.load(p_st + 3 * n_rows, mask=m_i, other=1.0)
        b_delta = tl.load(delta + i_bh * Lq + o_i, mask=m_i, other=0.0)
        b_R = tl.load(rterm + i_bh * Lq + o_i, mask=m_i, other=0.0)

        b_st = _dot(b_k, b_qt, QK_DT) * b_c[None, :]  # [BN, BM]
        b_f, b_sig = _softplus_sigmoid(b_st)
        b_dp = _dot(b_v, b_dot, PV_DT) - b_delta[None, :]  # [BN, BM] dP − D
        if (i0 + BM > Lq) | _tile_is_partial(i_n * BN, BN, Lk, off, i0, CAUSAL):
            # zero f, σ and dP − D where query i does not see key j (or either is out of range): then P, t
            # and dS are 0 there
            vis = tl.trans(_visible(o_i, o_j, Lk, off, CAUSAL)) & m_i[None, :]
            b_f = tl.where(vis, b_f, 0.0)
            b_sig = tl.where(vis, b_sig, 0.0)
            b_dp = tl.where(vis, b_dp, 0.0)
        b_iz = 1.0 / b_Z
        if REWEIGHT:
            b_a = tl.load(p_st + n_rows, mask=m_i, other=0.0)
            b_b = tl.load(p_st + 2 * n_rows, mask=m_i, other=0.0)
            ok = b_a > 0
            b_y = tl.maximum(b_a[None, :] * b_f - b_b[None, :], 0.0)
            b_g = _pow(b_y, P - 1.0, PM1_INT)  # y^(p−1); y^p = y^(p−1)·y
            b_p = tl.where(ok[None, :], b_g * b_y * (1.0 / b_U)[None, :], b_f * b_iz[None, :])
            b_t = tl.where(ok[None, :], tl.where(b_y > 0, (P * b_a / b_U)[None, :] * b_g * b_dp, 0.0),
                           b_dp * b_iz[None, :])
        else:
            b_p = b_f * b_iz[None, :]
            b_t = b_dp * b_iz[None, :]
        b_ds = (b_t - b_R[None, :]) * b_sig * b_c[None, :]  # [BN, BM] c_i·dS_ij
        b_dv += _dot(b_p, tl.trans(b_dot), PV_DT)  # [BN, D]
        b_dk += _dot(b_ds, tl.trans(b_qt), DS_DT)  # [BN, D]

    tl.store(dk + p_cols, b_dk.to(dk.dtype.element_ty), mask=m_j[:, None])
    tl.store(dv + p_cols, b_dv.to(dv.dtype.element_ty), mask=m_j[:, None])


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------


INTERPRETER_TILES = dict(BM=64, BN=64)
"""Tiles in the interpreter, whose cost grows with the number of tile iterations, not with their size."""

GPU_CANDIDATES = {  # (BM, BN, num_warps, num_stages); BM = query rows, BN = keys of one tile
    "fwd": [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
    "dq": [(64, 64, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3), (32, 32, 4, 3)],
    "dkdv": [(64, 32, 8, 3), (32, 64, 8, 3), (128, 32, 8, 3), (32, 32, 4, 3)],
}
"""Tile candidates for the GPU autotuner. With bf16 inputs they compile for sm_90 without register spills at
head dim 64 and with at most ~300 spilled bytes at 128 (checked offline with ``ptxas -v``; not yet timed on a
GPU). ``FREEATTEN_TILES=BM,BN,warps,stages`` replaces autotuning by one fixed configuration."""

_TUNED: dict = {}


def _launch(kernel, kind: str, n: int, BH: int, args: tuple, meta: dict) -> None:
    """Launch ``kernel`` on a grid of cdiv(n, tile) × B·H programs (tile: BM for the row kernels "fwd"/"dq",
    BN for "dkdv"): fixed tiles in the interpreter or from FREEATTEN_TILES, else autotuned per shape."""
    tile = "BN" if kind == "dkdv" else "BM"
    env = os.environ.get("FREEATTEN_TILES")
    if INTERPRET or env:
        if INTERPRET:
            cfg = dict(INTERPRETER_TILES)
        else:
            try:
                bm, bn, w, st = (int(x) for x in env.split(","))
            except ValueError:
                raise ValueError(f"FREEATTEN_TILES must be 'BM,BN,num_warps,num_stages', got {env!r}") from None
            cfg = dict(BM=bm, BN=bn, num_warps=w, num_stages=st)
        kernel[(triton.cdiv(n, cfg[tile]), BH)](*args, **meta, **cfg)
        return
    if kind not in _TUNED:  # every output is overwritten (no accumulation), so re-running configs is safe
        configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
                   for bm, bn, w, st in GPU_CANDIDATES[kind]]
        _TUNED[kind] = triton.autotune(configs, key=["Lq", "Lk", "D", "CAUSAL", "REWEIGHT", "QK_DT"])(kernel)
    _TUNED[kind][lambda m: (triton.cdiv(n, m[tile]), BH)](*args, **meta)


def _int_p(p: float) -> int:
    """p as an integer constexpr for square-and-multiply, or -1 for the general exp2/log2 power."""
    return int(p) if float(p).is_integer() and 0 <= p <= MAX_INT_P else -1


def _dot_types(dtype: torch.dtype) -> tuple[int, int, int]:
    """(QK, PV, dS) dot-operand codes: float32 for float32 inputs and in the interpreter (unless emulating the
    GPU's rounding); half-precision inputs on a GPU: float16, the input dtype, bfloat16."""
    if dtype == torch.float32 or (INTERPRET and not _EMULATE_GPU_DOTS):
        return _DT_F32, _DT_F32, _DT_F32
    bf16 = _DT_BF16_EMU if INTERPRET else _DT_BF16
    return _DT_F16, (bf16 if dtype == torch.bfloat16 else _DT_F16), bf16


def _scale(Lq: int, Lk: int, D: int, causal: bool, device) -> torch.Tensor:
    """c_i = ln(d)·ln(N_i) for every query row, [Lq] float32 (computed in float64, as the reference defines it)."""
    N = reference.row_counts(Lq, Lk, causal, dtype=torch.float64)
    return reference.length_scale(N, D).to(device=device, dtype=torch.float32)


def lssa_fwd(qh, kh, v, reweight: bool, causal: bool, p: float, offset_rows: int):
    """Forward launch. qh, kh: unit vectors [B, H, Lq|Lk, D] (float32 or float16), v [B, H, Lk, D].
    Returns o [B, H, Lq, D] in float32 (the backward's D_i = dO_i·o_i needs it unrounded: with p = 15 an error
    in D_i is amplified p-fold, and a bfloat16 o costs 2e-2 in the gradients), stats [4, B·H, Lq] float32, c."""
    B, H, Lq, D = qh.shape
    Lk = kh.shape[2]
    assert qh.is_contiguous() and kh.is_contiguous() and v.is_contiguous(), "lssa_fwd needs contiguous inputs"
    c = _scale(Lq, Lk, D, causal, qh.device)
    o = _new((B, H, Lq, D), torch.float32, qh.device)
    stats = _new((4, B * H, Lq), torch.float32, qh.device)
    qk_dt, pv_dt, _ = _dot_types(v.dtype)
    _launch(lssa_fwd_kernel, "fwd", Lq, B * H,
            (qh, kh, v, c, o, stats, Lq, Lk, Lk - Lq, offset_rows, float(p), B * H * Lq, Lq * D, D, Lk * D, D),
            dict(D=D, CAUSAL=causal, REWEIGHT=reweight, P_INT=_int_p(p), QK_DT=qk_dt, PV_DT=pv_dt))
    return o, stats, c


def lssa_bwd(qh, kh, v, o, do, stats, c, reweight: bool, causal: bool, p: float, offset_rows: int):
    """Backward launches: the dQ kernel (also writes D_i and R_i), then the dK/dV kernel.
    Returns dq̂, dk̂ (float32) and dv (v's dtype)."""
    B, H, Lq, D = qh.shape
    Lk = kh.shape[2]
    assert qh.is_contiguous() and kh.is_contiguous() and v.is_contiguous(), "lssa_bwd needs contiguous inputs"
    do = do.contiguous()
    dev = qh.device
    dq = _new((B, H, Lq, D), torch.float32, dev)
    dk = _new((B, H, Lk, D), torch.float32, dev)
    dv = _new((B, H, Lk, D), v.dtype, dev)
    delta = _new((B * H, Lq), torch.float32, dev)
    rterm = _new((B * H, Lq), torch.float32, dev)
    qk_dt, pv_dt, ds_dt = _dot_types(v.dtype)
    pm1 = _int_p(p) - 1 if _int_p(p) >= 1 else -1
    common = dict(D=D, CAUSAL=causal, REWEIGHT=reweight, PM1_INT=pm1, QK_DT=qk_dt, PV_DT=pv_dt, DS_DT=ds_dt)
    _launch(lssa_bwd_dq_kernel, "dq", Lq, B * H,
            (qh, kh, v, c, o, do, stats, dq, delta, rterm, Lq, Lk, Lk - Lq, offset_rows, float(p), B * H * Lq,
             Lq * D, D, Lk * D, D), common)
    _launch(lssa_bwd_dkdv_kernel, "dkdv", Lk, B * H,
            (qh, kh, v, c, do, stats, delta, rterm, dk, dv, Lq, Lk, Lk - Lq, float(p), B * H * Lq,
             Lq * D, D, Lk * D, D), common)
    return dq, dk, dv


class LSSAFunction(torch.autograd.Function):
    """o = LSSA / LSSAR(q̂, k̂, v) with fused forward and backward kernels (q̂, k̂: float32 unit vectors)."""

    @staticmethod
    def forward(ctx, qh, kh, v, reweight: bool, causal: bool, p: float, offset_rows: int):
        kdt = torch.float32 if v.dtype == torch.float32 else torch.float16  # see the module docstring
        qs, ks, v = qh.to(kdt).contiguous(), kh.to(kdt).contiguous(), v.contiguous()
        o, stats, c = lssa_fwd(qs, ks, v, reweight, causal, p, offset_rows)
        ctx.save_for_backward(qs, ks, v, o, stats, c)
        ctx.args = (reweight, causal, p, offset_rows)
        return o.to(v.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        qs, ks, v, o, stats, c = ctx.saved_tensors
        dq, dk, dv = lssa_bwd(qs, ks, v, o, do, stats, c, *ctx.args)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, method: str, causal: bool, p: float = 15.0, offset_rows: int = 3) -> torch.Tensor:
    """LSSA (``method="lssa"``) or LSSAR (``"lssar"``) through the fused kernels; the result has q's dtype.

    q [B, H, Lq, D], k/v [B, H, Lk, D]; causal uses bottom-right alignment (``Lq <= Lk``). The unit-sphere
    normalisation runs in PyTorch (float32) so autograd carries the gradient of q̂, k̂ back to q, k.
    """
    if method not in ("lssa", "lssar"):
        raise ValueError(f"the fused kernels implement 'lssa' and 'lssar', not {method!r}")
    why = unsupported_reason(q, k, v, explicit=True)
    if why is not None:
        raise ValueError(f"the fused kernels cannot run this call: {why}")
    qh = F.normalize(q.float(), dim=-1)
    kh = F.normalize(k.float(), dim=-1)
    return LSSAFunction.apply(qh, kh, v, method == "lssar", bool(causal), float(p), int(offset_rows))


def unsupported_reason(q, k, v, explicit: bool) -> str | None:
    """Why the fused kernels cannot run this call, or None when they can.

    ``explicit``: the caller asked for backend="triton" (then CPU tensors run in the Triton interpreter when
    TRITON_INTERPRET=1 was set before import). backend="auto" (explicit=False) picks the kernels only for
    CUDA tensors.
    """
    if q.dtype not in SUPPORTED_DTYPES:
        return (f"dtype {q.dtype} is not supported by the kernels (float32, float16, bfloat16); "
                f"use backend='reference' for it")
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        return (f"head dim {D} is not supported by the kernels (supported: "
                f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}); use backend='reference' for it")
    if (q.is_cuda and not INTERPRET and q.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(q.device) < (8, 0)):
        return "bfloat16 kernels need a GPU of compute capability 8.0 or newer (Ampere, Hopper)"
    if not q.is_cuda:
        if not explicit:
            return "backend='auto' uses the fused kernels only for CUDA tensors"
        if not INTERPRET:
            return (f"the tensors are on {q.device} and Triton needs a CUDA device; set TRITON_INTERPRET=1 before "
                    f"importing freeatten_core to run the kernels in the Triton interpreter on the CPU")
    if q.shape[-2] < 1 or k.shape[-2] < 1:
        return f"empty sequence (Lq={q.shape[-2]}, Lk={k.shape[-2]})"
    return None


__all__ = ["attention", "unsupported_reason", "LSSAFunction", "lssa_fwd", "lssa_bwd", "poison_outputs",
           "emulate_gpu_dots",
           "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "INTERPRET"]


def report_cases(D: int, dtype: str, causal: bool) -> list[dict]:
    """The kernel report's configurations (see :mod:`freeatten_core.kernel_report`): today's kernels with their
    first GPU tile candidate, and the softmax yardsticks in the same tiles."""
    dt = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    qk = "fp32" if dt == "fp32" else "fp16"
    codes = dict(QK_DT=_DT_F32, PV_DT=_DT_F32, DS_DT=_DT_F32) if dt == "fp32" else \
        dict(QK_DT=_DT_F16, PV_DT=_DT_BF16 if dt == "bf16" else _DT_F16, DS_DT=_DT_BF16)
    i32, f32 = "i32", "fp32"
    common = dict(Lq=i32, Lk=i32, off=i32)
    strides = dict(s_qbh=i32, s_ql=i32, s_kbh=i32, s_kl=i32)
    out = []

    def case(name, kernel, module, sig, const, kind, loops, budget_of=None):
        bm, bn, w, st = GPU_CANDIDATES[kind][0]
        out.append(dict(name=name, module=module, kernel=kernel, signature=sig, BM=bm, BN=bn, num_warps=w,
                        num_stages=st, constexprs=dict(const, BM=bm, BN=bn), loops=loops, D=D, dtype=dtype,
                        causal=causal, budget_of=budget_of or name))

    me = __name__
    for rw in (False, True):
        m = "lssar" if rw else "lssa"
        base = dict(D=D, CAUSAL=causal, REWEIGHT=rw)
        case(f"{m}_fwd", "lssa_fwd_kernel", me,
             dict(q="*" + qk, k="*" + qk, v="*" + dt, c="*fp32", o="*fp32", stats="*fp32", **common,
                  offset_rows=i32, P=f32, n_rows=i32, **strides),
             dict(base, P_INT=15, QK_DT=codes["QK_DT"], PV_DT=codes["PV_DT"]), "fwd",
             ["pass1", "pass2"] if rw else ["loop"])
        case(f"{m}_dq", "lssa_bwd_dq_kernel", me,
             dict(q="*" + qk, k="*" + qk, v="*" + dt, c="*fp32", o="*fp32", do="*" + dt, stats="*fp32",
                  dq="*fp32", delta="*fp32", rterm="*fp32", **common, offset_rows=i32, P=f32, n_rows=i32, **strides),
             dict(base, PM1_INT=14, **codes), "dq", ["loop"])
        case(f"{m}_dkdv", "lssa_bwd_dkdv_kernel", me,
             dict(q="*" + qk, k="*" + qk, v="*" + dt, c="*fp32", do="*" + dt, stats="*fp32", delta="*fp32",
                  rterm="*fp32", dk="*fp32", dv="*" + dt, **common, P=f32, n_rows=i32, **strides),
             dict(base, PM1_INT=14, **codes), "dkdv", ["loop"])
    from . import yardstick_kernels

    return out + yardstick_kernels.report_cases(D, dtype, causal, {k: v[0] for k, v in GPU_CANDIDATES.items()})
