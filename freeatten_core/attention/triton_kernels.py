"""Fused Triton kernels for LSSA / LSSAR (forward and backward); no ``[Lq, Lk]`` tensor is ever formed.

Contract with :mod:`freeatten_core.attention.api`:
  unsupported_reason(q, k, v, explicit) -> str | None   why the kernels cannot run this call (None: they can).
      ``explicit`` is True for backend="triton"; "auto" (explicit=False) only picks the kernels on CUDA.
  attention(q, k, v, method, causal, p=15.0, offset_rows=3) -> Tensor   differentiable, input dtype out.
Importing this module raises ImportError when triton is missing: the API then falls back / explains.

The math is derived in the book's kernel chapter (notebooks/03_gpu_kernel.ipynb); the plain-PyTorch specification is :mod:`.reference`. Per query row
``i`` (0-based) with ``N_i`` visible keys, ``c_i = ln(d)·ln(N_i)``, unit vectors ``q̂``, ``k̂``:

* forward LSSA (one pass over the keys): ``f = softplus(c·q̂·k̂)``, ``acc += f·V``, ``Z += Σf``, ``o = acc/Z``.
* forward LSSAR (two passes): pass 1 gives ``Z_i`` and ``F_i = max_j f_ij``, hence the row maximum
  ``M_i = N_i F_i/Z_i − O_i`` of ``x = N·f/Z − O``. Pass 2 forms the max-normalised power
  ``u = (ReLU(x)/M)^p ∈ [0, 1]`` -- which cannot overflow for any p -- as ``y = a_i f − b_i`` (one FMA, with
  ``a_i = N_i/(N_i F_i − O_i Z_i)``, ``b_i = O_i Z_i/(N_i F_i − O_i Z_i)``) and ``u = ReLU(y)^p`` (integer p by
  square-and-multiply on the FMA units, other p by exp2/log2); ``o = Σ u·V / Σ u``. A row with ``M_i ≤ 0``
  (exactly uniform) keeps its LSSA weights, as :func:`.reference.reweight` does.
* backward: the dQ kernel also computes the preprocess term ``D_i = dO_i·o_i`` and the row term ``R_i``
  (``R_i = O_i G_i / Z_i``) from the sums it accumulates anyway; the dK/dV kernel reads both.

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
* Only tiles that cross the causal diagonal or the end of a sequence are masked (a loop of their own), with one
  select per element: a masked score becomes −inf, and f = 0, σ = 0 and the re-weighted y = 0 follow from it.
  Tile sizes are autotuned on the GPU among candidates checked offline for register spills (``_launch``).
* The kernels see only finite numbers: :func:`attention` routes calls with NaN/±Inf in q, k, v (one
  ``isfinite`` reduction per call decides) through the reference's NaN-policy wrapper, and the backward does the
  same for a non-finite dO. No inner loop spends an instruction on non-finite values.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference

try:
    from .methods import P_MAX  # the largest re-weighting power the package accepts (one definition for all)
except ImportError:  # an older methods.py without it
    P_MAX = 1000.0

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether triton runs kernels in its interpreter (read once, at import, as triton itself does)."""

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
COMPILE_OPTIONS = dict(enable_fp_fusion=True)
"""Compiler options that every launch of the package's kernels passes, and the kernel report compiles with:
multiply-add contraction pinned on (Triton warns that its default changes in 3.10); the instruction budgets
assume FFMA."""
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
        r = tl.dot(_round_bf16(a.to(tl.float32)), _round_bf16(b.to(tl.float32)), input_precision="ieee")
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return r


# log2(1 + y) = y·q(y) for y ∈ (0, 1]: q fitted for least maximum *relative* error (Lawson's iteration on 6000
# Chebyshev nodes). Measured in float32 Horner against float64 over every float32 score (tests/test_kernels.py):
# degree 8 (float32 inputs) 3.5e-7, degree 4 (half-precision inputs) 3.9e-4. Degree 4 is below both roundings
# that half-precision inputs bring anyway: f goes into the P·V product as a bfloat16 (2^-9 = 2e-3) or float16
# (4.9e-4) operand, and the float16 q̂, k̂ put an error of c·2^-11 ≈ 1e-2 into the score (so about 1e-2 into f).
# Measured end to end (tests/test_kernels.py, GPU operand rounding emulated), degree 4 changes the outputs'
# and gradients' error against float64 by less than 1e-4; it saves one FMA per attention element in every loop.
SOFTPLUS_POLY = {
    8: (1.4426947832107544, -0.7213100790977478, 0.48006370663642883, -0.35339483618736267, 0.25600969791412354,
        -0.15535186231136322, 0.06360787898302078, -0.012319470755755901),
    4: (1.44212806224823, -0.7017472386360168, 0.3664805591106415, -0.10725437849760056),
}


@triton.jit
def _operand(x, DT: tl.constexpr):
    # float32 x rounded as the dot operand type DT rounds it (kept in that type; the emulation stays float32)
    if DT == 1:
        r = x.to(tl.float16)
    elif DT == 2:
        r = x.to(tl.bfloat16)
    elif DT == 3:
        r = _round_bf16(x)
    else:
        r = x
    return r


@triton.jit
def _ld(ptr, mask, DT: tl.constexpr):
    # a tile in the dot's operand type: half-precision operands stay as stored (the host stores them in the dot
    # type), float32 (and the interpreter's bfloat16 emulation) load as float32
    if mask is None:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=mask, other=0.0)
    if DT == 0 or DT == 3:
        x = x.to(tl.float32)
    return x


@triton.jit
def _softplus2(t, DEG: tl.constexpr):
    # f = log2(1 + 2^t) = max(t, 0) + log2(1 + y), y = 2^-|t| ∈ (0, 1]: one exp2 and a Horner polynomial on the
    # FMA units (no log, no series switch, no select). t = −inf (a masked score) gives y = 0 and f = 0 exactly.
    y = tl.math.exp2(-tl.abs(t))
    if DEG == 8:
        h = y * -0.012319470755755901 + 0.06360787898302078
        h = h * y - 0.15535186231136322
        h = h * y + 0.25600969791412354
        h = h * y - 0.35339483618736267
        h = h * y + 0.48006370663642883
        h = h * y - 0.7213100790977478
        h = h * y + 1.4426947832107544
    else:
        h = y * -0.10725437849760056 + 0.3664805591106415
        h = h * y - 0.7017472386360168
        h = h * y + 1.44212806224823
    return tl.maximum(t, 0.0) + y * h


@triton.jit
def _sigmoid2(t, f):
    # σ(s) = e^(s − softplus(s)) = 2^(t − f) in the log2 domain, from f = log2(1 + 2^t) already at hand: one
    # subtraction and one exp2, no division. t = −inf (masked) gives 2^-inf = 0. The error of f (the
    # polynomial's, relative to log2(1 + y) <= 1) enters σ only as a relative error of ln 2 times as much.
    return tl.math.exp2(t - f)


@triton.jit
def _sigmoid2_only(t):
    # σ(s) = 1/(1 + 2^-t) where f is not needed (LSSA's dQ): one exp2, one add, one approximate reciprocal.
    # 2^-t overflows to +inf for t < -128 (and for a masked t = −inf): 1/inf = 0, the right limit.
    e = 1.0 + tl.math.exp2(-t)
    return tl.fdiv(tl.full(e.shape, 1.0, tl.float32), e, approx=True)


@triton.jit
def _pow(y, P, P_INT: tl.constexpr):
    # y**P for y >= 0. P_INT >= 0: integer exponent on the FMA units: the shortest addition chain for 14 and 15
    # (p = 15 is the default: y², y³, y⁶, y¹², y¹⁵, five products), square-and-multiply otherwise;
    # P_INT < 0: the general power exp2(P·log2 y), 0 where y = 0.
    if P_INT == 15:
        y2 = y * y
        y3 = y2 * y
        y6 = y3 * y3
        r = (y6 * y6) * y3
    elif P_INT == 14:
        y2 = y * y
        y3 = y2 * y
        y6 = y3 * y3
        r = (y6 * y6) * y2
    elif P_INT == 0:  # the derivative's y^(p−1) for p = 1: the step of ReLU, 0 where y = 0
        r = tl.where(y > 0, 1.0, 0.0)
    elif P_INT >= 0:
        r = tl.zeros_like(y) + 1.0
        b = y
        for bit in tl.static_range(7):
            if (P_INT >> bit) & 1:
                r = r * b
            if (P_INT >> (bit + 1)) > 0:
                b = b * b
    else:
        r = tl.where(y > 0, tl.math.exp2(P * tl.math.log2(tl.maximum(y, 1e-30))), 0.0)
    return r


@triton.jit
def _sequence(seqs, i_s):
    # sequence i_s of the descriptor table [S, 5]: (batch, first query row, query rows, first key row, key rows)
    p = seqs + i_s * 5
    b = tl.load(p).to(tl.int64)
    q0 = tl.load(p + 1)
    k0 = tl.load(p + 3)
    return b, q0.to(tl.int64), tl.load(p + 2) - q0, k0.to(tl.int64), tl.load(p + 4) - k0


@triton.jit
def _next_tile(i0, rr, start, end, BM: tl.constexpr, LQ):
    # the next (query tile, head) of a key-side loop over the tiles [start, end) of each of a group's query heads:
    # the next tile, or at the end of the range the first tile of the next head (whose rows are LQ further on)
    i0 += BM
    wrap = i0 >= end
    return tl.where(wrap, start, i0), tl.where(wrap, rr + LQ, rr)


@triton.jit
def _key_range(m0, BM: tl.constexpr, BN: tl.constexpr, Lk, off, CAUSAL: tl.constexpr):
    # the keys of query rows [m0, m0 + BM): [0, n_full) are whole BN-tiles that every row sees entirely (no mask
    # there), [n_full, hi) the edge tiles (the causal diagonal and the end of the keys)
    if CAUSAL:
        n = tl.minimum(off + m0 + 1, Lk)
        hi = tl.minimum(Lk, off + m0 + BM)
    else:
        n = Lk
        hi = Lk
    return (n // BN) * BN, hi


@triton.jit
def _query_range(n0, BM: tl.constexpr, BN: tl.constexpr, Lq, Lk, off, CAUSAL: tl.constexpr):
    # the query tiles of keys [n0, n0 + BN): [lo, mid) hold rows that see only part of them (masked), [mid, Lq)
    # rows that see them all (full tiles; only the last may run past Lq)
    if CAUSAL:
        lo = (tl.maximum(n0 - off, 0) // BM) * BM
        mid = tl.minimum(tl.cdiv(tl.maximum(n0 + BN - 1 - off, 0), BM) * BM, Lq)
    else:
        lo = 0
        mid = 0
    if n0 + BN > Lk:  # the last key tile runs past Lk: every query tile is an edge tile
        mid = Lq
    return lo, mid


@triton.jit
def _query_tiles(n0, BM: tl.constexpr, BN: tl.constexpr, Lq, Lk, off, CAUSAL: tl.constexpr, EDGE: tl.constexpr):
    # the query rows [start, end) of a key-side loop over keys [n0, n0 + BN): EDGE the edge tiles (masked), else the
    # full ones (see _query_range); none for a key tile past the end of the sequence's keys
    lo, mid = _query_range(n0, BM, BN, Lq, Lk, off, CAUSAL)
    lo = tl.where(n0 < Lk, lo, Lq)
    mid = tl.maximum(lo, mid)
    if EDGE:
        start, end = lo, mid
    else:
        start, end = mid, Lq
    return start, end


@triton.jit
def _visible(o_i, o_j, Lk, off, CAUSAL: tl.constexpr):
    # [BM, BN] mask of the keys o_j that query rows o_i see
    vis = (o_j < Lk)[None, :] & (o_i >= 0)[:, None]
    if CAUSAL:
        vis = vis & (o_j[None, :] <= off + o_i[:, None])
    return vis


@triton.jit
def _keys_t(ptr, o_j, Lk, D: tl.constexpr, DT: tl.constexpr, MASKED: tl.constexpr):
    # [D, BN] tile of keys o_j (transposed); only an edge tile (MASKED) can run past Lk and needs the mask
    o_d = tl.arange(0, D)
    if MASKED:
        m = (o_j < Lk)[None, :]
    else:
        m = None
    return _ld(ptr + o_j[None, :] * D + o_d[:, None], m, DT)


@triton.jit
def _scores(b_q, k, o_i, o_j, Lk, off, D: tl.constexpr, CAUSAL: tl.constexpr, QK_DT: tl.constexpr,
            MASKED: tl.constexpr):
    # [BM, BN] t = q̃·k̂; on an edge tile a key the row does not see scores −inf (one select per element), which
    # gives f = 0, σ = 0 and, on re-weighted rows, y = ReLU(−b) = 0: no weight, no term in any sum
    b_t = _dot(b_q, _keys_t(k, o_j, Lk, D, QK_DT, MASKED), QK_DT)
    if MASKED:
        b_t = tl.where(_visible(o_i, o_j, Lk, off, CAUSAL), b_t, float("-inf"))
    return b_t


@triton.jit
def _values(v, o_j, Lk, D: tl.constexpr, DT: tl.constexpr, MASKED: tl.constexpr):
    # [BN, D] tile of values o_j
    o_d = tl.arange(0, D)
    if MASKED:
        m = (o_j < Lk)[:, None]
    else:
        m = None
    return _ld(v + o_j[:, None] * D + o_d[None, :], m, DT)


@triton.jit
def _fwd_pass1_tile(b_q, k, v, o_i, o_j, Lk, off, b_Z, b_T, b_acc,
                    D: tl.constexpr, CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, DEG: tl.constexpr,
                    QK_DT: tl.constexpr, PV_DT: tl.constexpr, MASKED: tl.constexpr):
    # Z += Σ f; LSSA: acc += f·v; LSSAR: T = max t (softplus is monotone, so F = f(T))
    b_t = _scores(b_q, k, o_i, o_j, Lk, off, D, CAUSAL, QK_DT, MASKED)
    b_f = _softplus2(b_t, DEG)
    b_Z += tl.sum(b_f, 1)
    if REWEIGHT:
        b_T = tl.maximum(b_T, tl.max(b_t, 1))
    else:
        b_acc += _dot(b_f, _values(v, o_j, Lk, D, PV_DT, MASKED), PV_DT)
    return b_Z, b_T, b_acc


@triton.jit
def _row_sum(x, PV_DT: tl.constexpr):
    # Σ_j x_ij as a [BM, 16] tile (every column the same). Half-precision operands: on the tensor cores, x times a
    # column of ones, summing exactly the rounded values that the P·V product uses; float32: on the FMA units
    if PV_DT == 0:
        r = tl.sum(x, 1)[:, None] + tl.zeros([x.shape[0], 16], dtype=tl.float32)
    else:
        r = _dot(x, tl.full([x.shape[1], 16], 1.0, tl.float32), PV_DT)
    return r


@triton.jit
def _fwd_pass2_tile(b_q, k, v, o_i, o_j, Lk, off, b_a, b_b, ok, P, b_U, b_acc, b_G, b_W,
                    D: tl.constexpr, CAUSAL: tl.constexpr, P_INT: tl.constexpr, PM1_INT: tl.constexpr,
                    DEG: tl.constexpr, QK_DT: tl.constexpr, PV_DT: tl.constexpr, GRAD: tl.constexpr,
                    MASKED: tl.constexpr):
    # u = ReLU(y)^p ∈ [0, 1] with y = a·f − b (LSSA rows: u = f); acc += u·v, U += Σ u. GRAD (the backward
    # follows): also g = y^(p−1), W += g·v and G += Σ g, from which the backward forms its row term R_i without a
    # pass of its own (u = g·y: one product more than y^p alone)
    b_f = _softplus2(_scores(b_q, k, o_i, o_j, Lk, off, D, CAUSAL, QK_DT, MASKED), DEG)
    b_y = tl.maximum(b_a[:, None] * b_f - b_b[:, None], 0.0)
    b_v = _values(v, o_j, Lk, D, PV_DT, MASKED)
    if GRAD:
        b_g = _pow(b_y, P - 1.0, PM1_INT)
        b_u = tl.where(ok[:, None], b_g * b_y, b_f)
        b_G += _row_sum(b_g, PV_DT)
        b_W += _dot(b_g, b_v, PV_DT)
    elif P_INT > 0 and P_INT % 2 == 1 and PV_DT != 0:
        # odd p keeps the sign of y, and rounding commutes with the ReLU: the power of y itself, rounded to the
        # half-precision operand, then the ReLU on packed pairs (HMNMX2: half an instruction per element)
        b_u = _operand(tl.where(ok[:, None], _pow(b_a[:, None] * b_f - b_b[:, None], P, P_INT), b_f), PV_DT)
        b_u = tl.maximum(b_u, 0.0)
    else:
        b_u = tl.where(ok[:, None], _pow(b_y, P, P_INT), b_f)
    b_U += _row_sum(b_u, PV_DT)
    b_acc += _dot(b_u, b_v, PV_DT)
    return b_U, b_acc, b_G, b_W


@triton.jit
def _dq_tile(b_q, b_do, k, kd, v, o_i, o_j, Lk, off, b_w, b_wd, b_a, b_b, P, b_acc1, b_acc2, b_H,
             D: tl.constexpr, CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, PM1_INT: tl.constexpr,
             DEG: tl.constexpr, QK_DT: tl.constexpr, PV_DT: tl.constexpr, DS_DT: tl.constexpr, MASKED: tl.constexpr):
    # acc1 += Σ_j t σ k̂, acc2 += Σ_j σ k̂ and H += Σ_j t (LSSAR), with t = g·w·(dP − D)
    b_kdt = _keys_t(kd, o_j, Lk, D, DS_DT, MASKED)  # [D, BN]
    b_t = _scores(b_q, k, o_i, o_j, Lk, off, D, CAUSAL, QK_DT, MASKED)  # [BM, BN]
    b_g = _dot(b_do, _keys_t(v, o_j, Lk, D, PV_DT, MASKED), PV_DT) * b_w[:, None] - b_wd[:, None]  # w·(dP − D)
    if REWEIGHT:
        b_f = _softplus2(b_t, DEG)
        b_sig = _sigmoid2(b_t, b_f)
        b_g *= _pow(tl.maximum(b_a[:, None] * b_f - b_b[:, None], 0.0), P - 1.0, PM1_INT)
        b_H += tl.sum(b_g, 1)
        b_acc2 += _dot(b_sig, tl.trans(b_kdt), DS_DT)
    else:
        b_sig = _sigmoid2_only(b_t)
    b_acc1 += _dot(b_g * b_sig, tl.trans(b_kdt), DS_DT)
    return b_acc1, b_acc2, b_H


# --------------------------------------------------------------------------------------------------------
# Forward. Scores in the log2 domain: the host folds c_i·log2(e) into q̂_i once per row, so t_ij = q̃_i·k̂_j =
# s_ij·log2(e) comes out of the tensor cores ready, and f_ij = softplus(s_ij)/ln 2 = log2(1 + 2^t). The ℓ1
# normalisation is blind to the factor 1/ln 2, and so is the re-weighting (x = N·f/Z − O).
# --------------------------------------------------------------------------------------------------------


@triton.jit
def lssa_fwd_kernel(
    q, k, v, o, stats, tau, w, seqs,
    LQ, LK, H, G, offset_rows, P, n_rows,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, P_INT: tl.constexpr, PM1_INT: tl.constexpr, DEG: tl.constexpr,
    QK_DT: tl.constexpr, PV_DT: tl.constexpr, GRAD: tl.constexpr,
):
    # one program: BM query rows of one sequence (seqs: see `attention`) and one query head. q [B, H, LQ, D]
    # (= c·log2(e)·q̂), k [B, H/G, LK, D] (= k̂; query head h reads key head h // G), v like k, o [B, H, LQ, D]
    # float32, tau [B, LQ] (LSSAR's uniform-row threshold τ_i),
    # stats [4, BH·Lq] = (1/Z, a, b, G) per row for the backward (n_rows = BH·Lq; a = 0 marks an LSSA row) and,
    # LSSAR with GRAD, w [BH, Lq, D] = W_i = Σ_j g_ij v_j and G_i = Σ_j g_ij, g = y^(p−1) of the final y.
    # Every input is finite here (the host routes non-finite inputs around the kernels: see `attention`).
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the last row tiles have the most keys, start them first
    i_s, i_h = tl.program_id(1) // H, tl.program_id(1) % H
    b, q0, Lq, k0, Lk = _sequence(seqs, i_s)  # from here on, Lq, Lk, off and the rows o_i are the sequence's
    off = Lk - Lq
    r0 = (b * H + i_h) * LQ + q0  # int64 (B·H·L·D may pass 2^31): the sequence's first row among all B·H·LQ
    o_i = i_m * BM + tl.arange(0, BM)  # [BM]
    o_d = tl.arange(0, D)
    m_i = o_i < Lq
    p_q = (r0 + o_i)[:, None] * D + o_d[None, :]
    b_q = _ld(q + p_q, m_i[:, None], QK_DT)  # [BM, D]
    k += ((b * (H // G) + i_h // G) * LK + k0) * D
    v += ((b * (H // G) + i_h // G) * LK + k0) * D
    n_full, hi = _key_range(i_m * BM, BM, BN, Lk, off, CAUSAL)
    hi = tl.where(i_m * BM < Lq, hi, 0)  # a row tile past this sequence's end (a shorter one): no work
    n_full = tl.minimum(n_full, hi)
    if CAUSAL:
        b_N = (off + o_i + 1).to(tl.float32)  # bottom-right alignment: row i sees keys j <= off + i
    else:
        b_N = tl.zeros([BM], dtype=tl.float32) + Lk
    b_O = tl.where(b_N > offset_rows, 1.0, 0.0)  # [BM]

    b_Z = tl.zeros([BM], dtype=tl.float32)
    b_T = tl.full([BM], float("-inf"), tl.float32)  # LSSAR: max_j t_ij (softplus is monotone: F = f(max t))
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    # pass 1 (LSSA: the only pass): full tiles without a mask, then the edge tiles (the causal diagonal and the
    # end of the keys), where a masked score is −inf: f = 0 (no weight, no term in Z), no candidate for max t
    for j0 in range(0, n_full, BN):
        b_Z, b_T, b_acc = _fwd_pass1_tile(b_q, k, v, o_i, j0 + tl.arange(0, BN), Lk, off, b_Z, b_T, b_acc,
                                          D, CAUSAL, REWEIGHT, DEG, QK_DT, PV_DT, False)
    for j0 in range(n_full, hi, BN):
        b_Z, b_T, b_acc = _fwd_pass1_tile(b_q, k, v, o_i, j0 + tl.arange(0, BN), Lk, off, b_Z, b_T, b_acc,
                                          D, CAUSAL, REWEIGHT, DEG, QK_DT, PV_DT, True)
    if REWEIGHT:
        # M = N·F/Z − O = den/Z; y = x/M = a·f − b. Rows with M <= τ (uniform up to rounding) keep LSSA weights:
        # a = 0, b = −1 gives y = 1 there, and the uniform row's weights come from 1/Z instead.
        b_F = _softplus2(b_T, DEG)
        b_den = b_N * b_F - b_O * b_Z
        b_tau = tl.load(tau + b * LQ + q0 + o_i, mask=m_i, other=0.0)
        ok = b_den > b_tau * b_Z
        b_rden = 1.0 / tl.where(ok, b_den, 1.0)
        b_a = tl.where(ok, b_N * b_rden, 0.0)
        b_b = tl.where(ok, b_O * b_Z * b_rden, -1.0)
        b_U2 = tl.zeros([BM, 16], dtype=tl.float32)
        b_G2 = tl.zeros([BM, 16], dtype=tl.float32)
        b_W = tl.zeros([BM, D], dtype=tl.float32)
        # pass 2: u = ReLU(y)^p ∈ [0, 1], acc = Σ u·v, U = Σ u   (LSSA rows: u = f). Masked: t = −inf, f = 0,
        # y = ReLU(−b) = 0 (b >= 0 on re-weighted rows), so u = 0 either way
        for j0 in range(0, n_full, BN):
            b_U2, b_acc, b_G2, b_W = _fwd_pass2_tile(b_q, k, v, o_i, j0 + tl.arange(0, BN), Lk, off, b_a, b_b, ok, P,
                                                     b_U2, b_acc, b_G2, b_W, D, CAUSAL, P_INT, PM1_INT, DEG, QK_DT,
                                                     PV_DT, GRAD, False)
        for j0 in range(n_full, hi, BN):
            b_U2, b_acc, b_G2, b_W = _fwd_pass2_tile(b_q, k, v, o_i, j0 + tl.arange(0, BN), Lk, off, b_a, b_b, ok, P,
                                                     b_U2, b_acc, b_G2, b_W, D, CAUSAL, P_INT, PM1_INT, DEG, QK_DT,
                                                     PV_DT, GRAD, True)
        b_U = tl.where(m_i, tl.max(b_U2, 1), 1.0)  # (rows past the sequence: U = 0, never stored)
        b_s = tl.math.exp2(-tl.math.log2(b_U) / P)  # U^(-1/p)
        b_a = tl.where(ok, b_a * b_s, 0.0)  # a' = a·U^(-1/p): y'^p = P
        b_b = tl.where(ok, b_b * b_s, -1.0)
        if GRAD:  # g' = y'^(p−1) = g·U^(-(p−1)/p)
            b_gs = tl.where(ok, tl.math.exp2(-tl.math.log2(b_U) * ((P - 1.0) / P)), 0.0)
            tl.store(w + p_q, b_W * b_gs[:, None], mask=m_i[:, None])
            tl.store(stats + r0 + o_i + 3 * n_rows, tl.max(b_G2, 1) * b_gs, mask=m_i)
    else:
        b_a = tl.zeros([BM], dtype=tl.float32)
        b_b = tl.zeros([BM], dtype=tl.float32) - 1.0
        b_U = b_Z

    b_o = b_acc / tl.where(m_i, b_U, 1.0)[:, None]
    tl.store(o + p_q, b_o.to(o.dtype.element_ty), mask=m_i[:, None])
    p_st = stats + r0 + o_i
    tl.store(p_st, 1.0 / tl.where(m_i, b_Z, 1.0), mask=m_i)
    tl.store(p_st + n_rows, b_a, mask=m_i)
    tl.store(p_st + 2 * n_rows, b_b, mask=m_i)


# --------------------------------------------------------------------------------------------------------
# Backward. Per visible (i, j), with y = a'_i f − b'_i and P = y^p (a' = a·U^(-1/p) stored by the forward, so
# P needs no division; LSSA and uniform rows: a' = 0, b' = −1, y = 1, and P = f/Z):
#   dP = dO_i·v_j,  D_i = dO_i·o_i,
#   t_ij = N_i dx_ij / Z_i = p·a'_i·y^(p−1)·(dP − D_i)   (LSSA rows: (dP − D_i)/Z_i),
#   R_i  = O_i/N_i · Σ_j t_ij   (= O_i G_i / Z_i; 0 for LSSA rows),   dt_ij = (t_ij − R_i)·σ(s_ij),
#   dq̃-direction: dq̂_i = c_i log2(e) Σ_j dt_ij k̂_j,  dk̂_j = Σ_i dt_ij q̃_i,  dv_j = Σ_i P_ij dO_i.
# (the derivative of f = log2(1 + 2^t) by t is σ(s), so the log2 domain changes nothing else.)
# R_i needs the whole row first, so the dQ kernel accumulates Σ t σ k̂, Σ σ k̂ and Σ t side by side and combines
# them at the end: dq̂_i ∝ Σ_j t_ij σ_ij k̂_j − R_i Σ_j σ_ij k̂_j. It writes w_i·D_i and R_i for the dK/dV
# kernel.
# Per row the kernels use w_i = p·a'_i (LSSAR rows) or 1/Z_i (LSSA rows): t = g·w·(dP − D), g = y^(p−1) (= 1 on
# LSSA rows).
# --------------------------------------------------------------------------------------------------------


@triton.jit
def lssa_bwd_dq_kernel(
    q, k, kd, v, o, do, dos, stats, dq, delta, rterm, seqs,
    LQ, LK, H, G, offset_rows, P, n_rows,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, PM1_INT: tl.constexpr, DEG: tl.constexpr,
    QK_DT: tl.constexpr, PV_DT: tl.constexpr, DS_DT: tl.constexpr, PRESCALE: tl.constexpr,
    GROUPED: tl.constexpr = False,
):
    # q/o/do/dq [BH, Lq, D] (dq: Σ_j dt_ij k̂_j, scaled on the host), k/v [BH, Lk, D]; delta, rterm [BH·Lq]
    # (delta receives w_i·D_i, the form the dK/dV kernel uses). kd: k̂ once more in the dS products' operand type
    # (see qd in the dK/dV kernel). PRESCALE (LSSA with bfloat16 or float32 dot
    # operands): also write dos = dO_i/Z_i rounded as the dK/dV kernel's operand, and w·D from those rounded values
    # (so that its dP − D stays an exact difference for a cotangent perturbed by one rounding, 2^-9 relative).
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_s, i_h = tl.program_id(1) // H, tl.program_id(1) % H
    b, q0, Lq, k0, Lk = _sequence(seqs, i_s)  # (as in the forward kernel)
    off = Lk - Lq
    r0 = (b * H + i_h) * LQ + q0
    o_i = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_i = o_i < Lq
    p_q = (r0 + o_i)[:, None] * D + o_d[None, :]
    b_q = _ld(q + p_q, m_i[:, None], QK_DT)  # [BM, D]
    b_do = _ld(do + p_q, m_i[:, None], PV_DT)  # [BM, D]
    b_o = tl.load(o + p_q, mask=m_i[:, None], other=0.0)  # [BM, D] float32
    b_delta = tl.sum(b_do.to(tl.float32) * b_o, 1)  # D_i = dO_i·o_i
    p_st = stats + r0 + o_i
    b_iz = tl.load(p_st, mask=m_i, other=1.0)
    kr0 = (b * (H // G) + i_h // G) * LK + k0
    k += kr0 * D
    kd += kr0 * D
    v += kr0 * D
    n_full, hi = _key_range(i_m * BM, BM, BN, Lk, off, CAUSAL)
    hi = tl.where(i_m * BM < Lq, hi, 0)
    n_full = tl.minimum(n_full, hi)
    if CAUSAL:
        b_N = (off + o_i + 1).to(tl.float32)
    else:
        b_N = tl.zeros([BM], dtype=tl.float32) + Lk
    if REWEIGHT:
        b_a = tl.load(p_st + n_rows, mask=m_i, other=0.0)
        b_b = tl.load(p_st + 2 * n_rows, mask=m_i, other=-1.0)
        b_w = tl.where(b_a > 0, P * b_a, b_iz)
    else:
        b_w = b_iz
        b_a = tl.zeros([BM], dtype=tl.float32)  # unused on LSSA rows
        b_b = b_a
    b_wd = b_w * b_delta
    b_wd_kv = b_wd  # the w·D of the dK/dV kernel
    if PRESCALE:
        b_dos = _operand(b_do.to(tl.float32) * b_iz[:, None], PV_DT)  # [BM, D] dO/Z
        tl.store(dos + p_q, b_dos.to(dos.dtype.element_ty), mask=m_i[:, None])
        b_wd_kv = tl.sum(b_dos.to(tl.float32) * b_o, 1)

    b_acc1 = tl.zeros([BM, D], dtype=tl.float32)  # Σ_j t σ k̂
    b_acc2 = tl.zeros([BM, D], dtype=tl.float32)  # Σ_j σ k̂   (LSSAR only)
    b_H = tl.zeros([BM], dtype=tl.float32)  # Σ_j t
    # full tiles, then the edge tiles (a masked score is −inf: σ = 0, no term in either sum; y = ReLU(−b) = 0 on
    # re-weighted rows, no term in Σ t; on LSSA rows R = 0 and Σ t is not used)
    for j0 in range(0, n_full, BN):
        b_acc1, b_acc2, b_H = _dq_tile(b_q, b_do, k, kd, v, o_i, j0 + tl.arange(0, BN), Lk, off, b_w, b_wd, b_a, b_b,
                                       P, b_acc1, b_acc2, b_H, D, CAUSAL, REWEIGHT, PM1_INT, DEG, QK_DT, PV_DT,
                                       DS_DT, False)
    for j0 in range(n_full, hi, BN):
        b_acc1, b_acc2, b_H = _dq_tile(b_q, b_do, k, kd, v, o_i, j0 + tl.arange(0, BN), Lk, off, b_w, b_wd, b_a, b_b,
                                       P, b_acc1, b_acc2, b_H, D, CAUSAL, REWEIGHT, PM1_INT, DEG, QK_DT, PV_DT,
                                       DS_DT, True)

    if REWEIGHT:
        b_R = tl.where(b_a > 0, b_H * tl.where(b_N > offset_rows, 1.0, 0.0) / b_N, 0.0)  # [BM]
        b_dq = b_acc1 - b_R[:, None] * b_acc2
    else:
        b_R = tl.zeros([BM], dtype=tl.float32)
        b_dq = b_acc1
    tl.store(dq + p_q, b_dq.to(dq.dtype.element_ty), mask=m_i[:, None])
    tl.store(delta + r0 + o_i, b_wd_kv, mask=m_i)
    tl.store(rterm + r0 + o_i, b_R, mask=m_i)


@triton.jit
def _dkdv_tile(b_k, b_v, q, qd, do, p_st, delta, rterm, n_rows, o_i, o_j, Lq, Lk, off, P, b_dk, b_dv,
               D: tl.constexpr, CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, PM1_INT: tl.constexpr,
               DEG: tl.constexpr, QK_DT: tl.constexpr, PV_DT: tl.constexpr, DS_DT: tl.constexpr,
               PRESCALE: tl.constexpr, MASKED: tl.constexpr):
    # dv += Σ_i P_ij dO_i and dk += Σ_i dt_ij q̃_i over the query rows o_i, in the transposed orientation [BN, BM]
    o_d = tl.arange(0, D)
    m_i = o_i < Lq  # rows past Lq load 0 everywhere (a plain zero-filled copy, no select): P = 0, dt = 0
    p_t = o_i[None, :] * D + o_d[:, None]
    b_qt = _ld(q + p_t, m_i[None, :], QK_DT)  # [D, BM]
    b_qd = _ld(qd + p_t, m_i[None, :], DS_DT)  # [D, BM]
    b_dot = _ld(do + p_t, m_i[None, :], PV_DT)  # [D, BM]
    b_wd = tl.load(delta + o_i, mask=m_i, other=0.0)
    b_t = _dot(b_k, b_qt, QK_DT)  # [BN, BM]
    if MASKED:  # a masked score is −inf, so f = 0, σ = 0 and y = ReLU(−b) = 0: P = 0 and dt = 0
        b_t = tl.where(tl.trans(_visible(o_i, o_j, Lk, off, CAUSAL)), b_t, float("-inf"))
    b_dp = _dot(b_v, b_dot, PV_DT)  # [BN, BM]
    b_f = _softplus2(b_t, DEG)
    b_sig = _sigmoid2(b_t, b_f)
    if REWEIGHT:
        b_iz = tl.load(p_st + o_i, mask=m_i, other=0.0)
        b_a = tl.load(p_st + n_rows + o_i, mask=m_i, other=0.0)
        b_b = tl.load(p_st + 2 * n_rows + o_i, mask=m_i, other=0.0)
        b_R = tl.load(rterm + o_i, mask=m_i, other=0.0)
        lssar = b_a > 0
        b_w = tl.where(lssar, P * b_a, b_iz)
        b_y = tl.maximum(b_a[None, :] * b_f - b_b[None, :], 0.0)
        b_g = _pow(b_y, P - 1.0, PM1_INT)  # y^(p−1); P = y^(p−1)·y·(1 on LSSAR rows, f/Z on LSSA rows: y = 1)
        b_p = (b_g * b_y) * (tl.where(lssar, 1.0, 0.0)[None, :] + tl.where(lssar, 0.0, b_iz)[None, :] * b_f)
        b_ds = (b_g * (b_dp * b_w[None, :] - b_wd[None, :]) - b_R[None, :]) * b_sig  # [BN, BM] dt_ij
    elif PRESCALE:
        b_p = b_f
        b_ds = (b_dp - b_wd[None, :]) * b_sig
    else:
        b_iz = tl.load(p_st + o_i, mask=m_i, other=0.0)
        b_p = b_f * b_iz[None, :]
        b_ds = (b_dp * b_iz[None, :] - b_wd[None, :]) * b_sig
    b_dv += _dot(b_p, tl.trans(b_dot), PV_DT)  # [BN, D]
    b_dk += _dot(b_ds, tl.trans(b_qd), DS_DT)  # [BN, D]
    return b_dk, b_dv


@triton.jit
def lssa_bwd_dkdv_kernel(
    q, qd, k, v, do, stats, delta, rterm, dk, dv, seqs,
    LQ, LK, H, G, P, n_rows,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, PM1_INT: tl.constexpr, DEG: tl.constexpr,
    QK_DT: tl.constexpr, PV_DT: tl.constexpr, DS_DT: tl.constexpr, PRESCALE: tl.constexpr,
    GROUPED: tl.constexpr = False,
):
    # one program: BN keys of one (batch, head), looping over the query tiles that see them (causal: the first
    # key tiles have the most, and start first). Transposed orientation [BN, BM]: both products are row-major.
    # delta holds w_i·D_i (written by the dQ kernel). qd: q (= c·log2(e)·q̂) once more, stored in the dS product's
    # operand type (bfloat16 for half-precision inputs, where q itself is float16 for the scores): the loop then
    # loads the tile instead of converting it element by element. PRESCALE (LSSA): do holds dO_i/Z_i (from the dQ
    # kernel), so P = f/Z needs no product: dv = Σ f·(dO/Z), dt = (dO/Z·v − w·D)·σ.
    i_n = tl.program_id(0)
    i_s, i_hk = tl.program_id(1) // (H // G), tl.program_id(1) % (H // G)
    b, q0, Lq, k0, Lk = _sequence(seqs, i_s)
    off = Lk - Lq
    o_j = i_n * BN + tl.arange(0, BN)  # [BN] keys
    o_d = tl.arange(0, D)
    m_j = o_j < Lk
    p_k = ((b * (H // G) + i_hk) * LK + k0 + o_j)[:, None] * D + o_d[None, :]
    b_k = _ld(k + p_k, m_j[:, None], QK_DT)  # [BN, D]
    b_v = _ld(v + p_k, m_j[:, None], PV_DT)  # [BN, D]
    qr0 = (b * H + i_hk * G) * LQ + q0  # the first row of the group's first query head; head g: + g·LQ

    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    # edge tiles (MASKED), then full tiles (only the last may run past Lq), of the G query heads that read these
    # keys. Grouped queries (GROUPED: G > 1) make each a loop over (head, tile): i0 runs over the tiles, and at the
    # end of a head's tiles starts again for the next head (rows rr + LQ); G = 1 keeps plain loops
    for phase in tl.static_range(2):
        start, end = _query_tiles(i_n * BN, BM, BN, Lq, Lk, off, CAUSAL, phase == 0)
        if GROUPED:
            i0, rr = start, qr0
            for _ in range(0, G * tl.cdiv(end - start, BM)):
                b_dk, b_dv = _dkdv_tile(b_k, b_v, q + rr * D, qd + rr * D, do + rr * D, stats + rr, delta + rr,
                                        rterm + rr, n_rows, i0 + tl.arange(0, BM), o_j, Lq, Lk, off, P, b_dk, b_dv,
                                        D, CAUSAL, REWEIGHT, PM1_INT, DEG, QK_DT, PV_DT, DS_DT, PRESCALE, phase == 0)
                i0, rr = _next_tile(i0, rr, start, end, BM, LQ)
        else:
            for i0 in range(start, end, BM):
                b_dk, b_dv = _dkdv_tile(b_k, b_v, q + qr0 * D, qd + qr0 * D, do + qr0 * D, stats + qr0, delta + qr0,
                                        rterm + qr0, n_rows, i0 + tl.arange(0, BM), o_j, Lq, Lk, off, P, b_dk, b_dv,
                                        D, CAUSAL, REWEIGHT, PM1_INT, DEG, QK_DT, PV_DT, DS_DT, PRESCALE, phase == 0)

    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_j[:, None])
    tl.store(dv + p_k, b_dv.to(dv.dtype.element_ty), mask=m_j[:, None])


# --------------------------------------------------------------------------------------------------------
# Backward in one pass (the default): the dK/dV kernel's loop also forms dq̃ᵀ_tile = k̂ᵀ·dt and adds it to dq with
# float32 atomics, so every attention element is recomputed once in the backward instead of twice (once per
# kernel above). What made a pass of its own necessary, LSSAR's row term R_i = O_i/N_i·Σ_j t_ij, needs the
# whole row; it equals O_i/N_i·p·a'_i·(dO_i·W_i − D_i·G_i) with W_i = Σ_j g_ij v_j and G_i = Σ_j g_ij, which the
# forward accumulates on its second pass (g = y^(p−1) is on the way to y^p), so the host forms R_i and every other
# per-row quantity with a few O(L·d) tensor operations before the kernel runs. The atomics make the float32
# summation order of dq vary from run to run; torch.use_deterministic_algorithms(True) selects the two kernels
# above instead, whose results are bitwise reproducible.
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_tile(b_k, b_kd, b_v, q, qd, do, rows, dq, n_rows, o_i, o_j, Lq, Lk, off, P, b_dk, b_dv,
              D: tl.constexpr, CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, PM1_INT: tl.constexpr,
              DEG: tl.constexpr, QK_DT: tl.constexpr, PV_DT: tl.constexpr, DS_DT: tl.constexpr,
              PRESCALE: tl.constexpr, MASKED: tl.constexpr):
    # one [BN keys, BM query rows] tile: dv += Σ_i P_ij dO_i, dk += Σ_i dt_ij q̃_i, dq_i += Σ_j dt_ij k̂_j (atomics)
    o_d = tl.arange(0, D)
    m_i = o_i < Lq  # rows past Lq load 0 everywhere: P = 0, dt = 0
    p_t = o_i[None, :] * D + o_d[:, None]
    b_qt = _ld(q + p_t, m_i[None, :], QK_DT)  # [D, BM]
    b_qd = _ld(qd + p_t, m_i[None, :], DS_DT)  # [D, BM]
    b_dot = _ld(do + p_t, m_i[None, :], PV_DT)  # [D, BM]
    b_wd = tl.load(rows + o_i, mask=m_i, other=0.0)  # w·D
    b_t = _dot(b_k, b_qt, QK_DT)  # [BN, BM]
    if MASKED:  # a masked score is −inf: f = 0, σ = 0 and y = ReLU(−b) = 0, so P = 0 and dt = 0
        b_t = tl.where(tl.trans(_visible(o_i, o_j, Lk, off, CAUSAL)), b_t, float("-inf"))
    b_dp = _dot(b_v, b_dot, PV_DT)  # [BN, BM]
    b_f = _softplus2(b_t, DEG)
    b_sig = _sigmoid2(b_t, b_f)
    if REWEIGHT:
        # rows = (w·D, w, a', b', A, B, R): y = a'f − b', g = y^(p−1), P = g·(A f − B) (A, B = a', b' on re-weighted
        # rows; 1/Z, 0 on rows that keep LSSA weights, where y = 1), dt = (g·(w dP − w·D) − R)·σ
        b_w = tl.load(rows + n_rows + o_i, mask=m_i, other=0.0)
        b_a = tl.load(rows + 2 * n_rows + o_i, mask=m_i, other=0.0)
        b_b = tl.load(rows + 3 * n_rows + o_i, mask=m_i, other=0.0)
        b_A = tl.load(rows + 4 * n_rows + o_i, mask=m_i, other=0.0)
        b_B = tl.load(rows + 5 * n_rows + o_i, mask=m_i, other=0.0)
        b_R = tl.load(rows + 6 * n_rows + o_i, mask=m_i, other=0.0)
        b_g = _pow(tl.maximum(b_a[None, :] * b_f - b_b[None, :], 0.0), P - 1.0, PM1_INT)
        b_p = b_g * (b_A[None, :] * b_f - b_B[None, :])
        b_ds = (b_g * (b_dp * b_w[None, :] - b_wd[None, :]) - b_R[None, :]) * b_sig
    elif PRESCALE:  # do holds dO/Z: P = f, dt = (dO/Z·v − w·D)·σ
        b_p = b_f
        b_ds = (b_dp - b_wd[None, :]) * b_sig
    else:  # rows = (w·D, 1/Z)
        b_iz = tl.load(rows + n_rows + o_i, mask=m_i, other=0.0)
        b_p = b_f * b_iz[None, :]
        b_ds = (b_dp * b_iz[None, :] - b_wd[None, :]) * b_sig
    b_dv += _dot(b_p, tl.trans(b_dot), PV_DT)  # [BN, D]
    b_dk += _dot(b_ds, tl.trans(b_qd), DS_DT)  # [BN, D]
    b_dqt = _dot(tl.trans(b_kd), b_ds, DS_DT)  # [D, BM]
    tl.atomic_add(dq + p_t, b_dqt, mask=m_i[None, :], sem="relaxed")
    return b_dk, b_dv


@triton.jit
def lssa_bwd_kernel(
    q, qd, k, kd, v, do, rows, dq, dk, dv, seqs,
    LQ, LK, H, G, P, n_rows,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    CAUSAL: tl.constexpr, REWEIGHT: tl.constexpr, PM1_INT: tl.constexpr, DEG: tl.constexpr,
    QK_DT: tl.constexpr, PV_DT: tl.constexpr, DS_DT: tl.constexpr, PRESCALE: tl.constexpr,
    GROUPED: tl.constexpr = False,
):
    # one program: BN keys of one (batch, head), looping over the query tiles that see them, as the dK/dV kernel
    # does; dq [BH, Lq, D] float32 must be zero on entry. rows [7 | 2 | 1, BH·Lq]: the per-row quantities the host
    # formed (see _bwd_tile). kd: k̂ in the dS products' operand type.
    i_n = tl.program_id(0)
    i_s, i_hk = tl.program_id(1) // (H // G), tl.program_id(1) % (H // G)
    b, q0, Lq, k0, Lk = _sequence(seqs, i_s)
    off = Lk - Lq
    o_j = i_n * BN + tl.arange(0, BN)  # [BN] keys
    o_d = tl.arange(0, D)
    m_j = o_j < Lk
    p_k = ((b * (H // G) + i_hk) * LK + k0 + o_j)[:, None] * D + o_d[None, :]
    b_k = _ld(k + p_k, m_j[:, None], QK_DT)  # [BN, D]
    b_kd = _ld(kd + p_k, m_j[:, None], DS_DT)  # [BN, D]
    b_v = _ld(v + p_k, m_j[:, None], PV_DT)  # [BN, D]
    qr0 = (b * H + i_hk * G) * LQ + q0  # the first row of the group's first query head; head g: + g·LQ

    b_dk = tl.zeros([BN, D], dtype=tl.float32)
    b_dv = tl.zeros([BN, D], dtype=tl.float32)
    for phase in tl.static_range(2):  # edge tiles, then full tiles, of the G query heads (see the dK/dV kernel)
        start, end = _query_tiles(i_n * BN, BM, BN, Lq, Lk, off, CAUSAL, phase == 0)
        if GROUPED:
            i0, rr = start, qr0
            for _ in range(0, G * tl.cdiv(end - start, BM)):
                b_dk, b_dv = _bwd_tile(b_k, b_kd, b_v, q + rr * D, qd + rr * D, do + rr * D, rows + rr, dq + rr * D,
                                       n_rows, i0 + tl.arange(0, BM), o_j, Lq, Lk, off, P, b_dk, b_dv, D,
                                       CAUSAL, REWEIGHT, PM1_INT, DEG, QK_DT, PV_DT, DS_DT, PRESCALE, phase == 0)
                i0, rr = _next_tile(i0, rr, start, end, BM, LQ)
        else:
            for i0 in range(start, end, BM):
                b_dk, b_dv = _bwd_tile(b_k, b_kd, b_v, q + qr0 * D, qd + qr0 * D, do + qr0 * D, rows + qr0,
                                       dq + qr0 * D, n_rows, i0 + tl.arange(0, BM), o_j, Lq, Lk, off, P, b_dk, b_dv,
                                       D, CAUSAL, REWEIGHT, PM1_INT, DEG, QK_DT, PV_DT, DS_DT, PRESCALE, phase == 0)

    tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_j[:, None])
    tl.store(dv + p_k, b_dv.to(dv.dtype.element_ty), mask=m_j[:, None])


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------


INTERPRETER_TILES = dict(BM=64, BN=64)
"""Tiles in the interpreter, whose cost grows with the number of tile iterations, not with their size."""

TILES = {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (32, 128, 8, 2)}
"""The main GPU configuration per kernel (BM query rows, BN keys, num_warps, num_stages): the one the kernel
report compiles and budgets (``python -m freeatten_core kernel-report``), with the softmax yardsticks in the
same tiles. The dK/dV kernel works on [BN, BM] = [128, 32] tiles so that its matmuls have 128 rows: warpgroup MMA
(HGMMA) on Hopper, where a 64×32 tile fell back to mma.sync; [128, 64] spills at head dim 64."""

GPU_CANDIDATES = {kind: [TILES[kind], *more] for kind, more in {
    "fwd": [(128, 128, 8, 3), (64, 64, 4, 3)],
    "dq": [(64, 64, 4, 3), (128, 128, 8, 2)],
    "dkdv": [(64, 64, 4, 3), (128, 128, 8, 2)],
}.items()}
"""Tile candidates for the GPU autotuner (the first is :data:`TILES`). ``FREEATTEN_TILES=BM,BN,warps,stages``
replaces autotuning by one fixed configuration."""

_TUNED: dict = {}


def _launch(kernel, kind: str, n: int, BH: int, args: tuple, meta: dict) -> None:
    """Launch ``kernel`` on a grid of cdiv(n, tile) × B·H programs (tile: BM for the row kernels "fwd"/"dq",
    BN for "dkdv"): fixed tiles in the interpreter or from FREEATTEN_TILES, else autotuned per shape and dtype."""
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
        kernel[(triton.cdiv(n, cfg[tile]), BH)](*args, **meta, **cfg, **COMPILE_OPTIONS)
        return
    if kind not in _TUNED:  # every output is overwritten (no accumulation), so re-running configs is safe
        configs = [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
                   for bm, bn, w, st in GPU_CANDIDATES[kind]]
        _TUNED[kind] = triton.autotune(configs, key=["LQ", "LK", "G", "D", "CAUSAL", "REWEIGHT", "QK_DT", "PV_DT"])(kernel)
    _TUNED[kind][lambda m: (triton.cdiv(n, m[tile]), BH)](*args, **meta, **COMPILE_OPTIONS)


def _int_p(p: float) -> int:
    """p as an integer constexpr for repeated multiplication, or -1 for the general exp2/log2 power."""
    return int(p) if float(p).is_integer() and 0 <= p <= MAX_INT_P else -1


def _dot_types(dtype: torch.dtype) -> tuple[int, int, int]:
    """(QK, PV, dS) dot-operand codes: float32 for float32 inputs and in the interpreter (unless emulating the
    GPU's rounding); half-precision inputs on a GPU: float16, the input dtype, bfloat16."""
    if dtype == torch.float32 or (INTERPRET and not _EMULATE_GPU_DOTS):
        return _DT_F32, _DT_F32, _DT_F32
    bf16 = _DT_BF16_EMU if INTERPRET else _DT_BF16
    return _DT_F16, (bf16 if dtype == torch.bfloat16 else _DT_F16), bf16


def _prescale(reweight: bool, pv_dt: int) -> bool:
    """Whether the dK/dV kernel takes dO/Z instead of dO (LSSA only): with bfloat16 (or float32) operands, whose
    range holds dO/Z for any Z; float16's would underflow for long rows (Z ~ N), so float16 inputs keep dO."""
    return not reweight and pv_dt != _DT_F16


def _degree(dtype: torch.dtype) -> int:
    """Degree of the softplus polynomial: 8 for float32 inputs, 4 for half precision (see SOFTPLUS_POLY)."""
    return 8 if dtype == torch.float32 else 4


def _segments(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments of ``counts`` rows each, laid end to end: the segment of every row and its index within it."""
    idx = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    return idx, torch.arange(int(counts.sum()), device=counts.device) - starts[idx]


class Layout:
    """How the rows of one call are laid out: q [B, H, LQ, D], k/v [B, H/G, LK, D] (G query heads per key head)
    and the sequence descriptors ``seqs`` int32 [S, 5] = (batch, q_start, q_end, k_start, k_end) on the device
    (see :func:`attention`), with the per-row quantities the host needs: N [B, LQ] float64 (0 where a row is in
    no sequence), the query rows and key rows that are in some sequence ([B, LQ], [B, LK] bool; None when every
    row is), and the largest sequence lengths (the launch grids)."""

    def __init__(self, q_shape, k_shape, seqs: torch.Tensor | None, causal: bool, device):
        B, H, LQ, D = q_shape
        Hk, LK = k_shape[1], k_shape[2]
        self.B, self.H, self.G, self.LQ, self.LK, self.D = B, H, H // Hk, LQ, LK, D
        if seqs is None:
            self.seqs = torch.tensor([[b, 0, LQ, 0, LK] for b in range(B)], dtype=torch.int32, device=device)
            self.N = reference.row_counts(LQ, LK, causal, dtype=torch.float64)[None, :].expand(B, LQ).to(device)
            self.q_rows = self.k_rows = None
            self.max_q, self.max_k = LQ, LK
            return
        sq = seqs.to(device=device, dtype=torch.int64)
        b, q0, q1, k0, k1 = sq.unbind(1)
        nq, nk = q1 - q0, k1 - k0
        self.seqs = seqs.to(device=device, dtype=torch.int32).contiguous()
        # N of every query row of every sequence, scattered into [B, LQ] without a loop over the sequences
        idx, within = _segments(nq)
        n = (within + (nk - nq)[idx] + 1) if causal else nk[idx]
        self.N = torch.zeros(B, LQ, dtype=torch.float64, device=device)
        self.N[b[idx], q0[idx] + within] = n.to(torch.float64)
        self.q_rows = self.N > 0
        kidx, kwithin = _segments(nk)
        self.k_rows = torch.zeros(B, LK, dtype=torch.bool, device=device)
        self.k_rows[b[kidx], k0[kidx] + kwithin] = True
        self.max_q, self.max_k = int(nq.max()), int(nk.max())

    def row_constants(self):
        """Per (batch, query row), float32 [B, LQ]: c_i·log2(e) (folded into q̂) and LSSAR's uniform-row threshold
        τ_i, from the reference's own definitions (computed in float64); 0 on rows in no sequence."""
        N = self.N.clamp_min(1.0)
        c = reference.length_scale(N, self.D)
        tau = reference.uniform_threshold(c, N, self.D, torch.float32)
        c2 = torch.where(self.N > 0, c * LOG2E, 0.0)
        return c2.to(torch.float32), tau.to(torch.float32).contiguous()

    def zero_outside(self, x: torch.Tensor, keys: bool = False) -> torch.Tensor:
        """x [B, heads, rows, D] with the rows that are in no sequence set to 0 (the kernels do not write them)."""
        rows = self.k_rows if keys else self.q_rows
        return x if rows is None else torch.where(rows[:, None, :, None], x, 0.0).to(x.dtype)


def lssa_fwd(qs, ks, v, tau, reweight: bool, causal: bool, p: float, offset_rows: int, grad: bool = False,
             layout: Layout | None = None):
    """Forward launch. qs = c·log2(e)·q̂ [B, H, LQ, D] and ks = k̂ [B, H/G, LK, D] (float32, or float16 for half
    inputs), v like ks, tau [B, LQ] (:meth:`Layout.row_constants`). Returns o [B, H, LQ, D] in float32 (the
    backward's D_i = dO_i·o_i needs it unrounded: with p = 15 an error in D_i is amplified p-fold), stats
    [4, B·H, LQ] float32 (1/Z, a', b', G) and, for LSSAR with ``grad`` (a backward will follow), W [B, H, LQ, D]
    float32 (else None): see :func:`lssa_bwd`. Rows in no sequence of ``layout`` are not written."""
    B, H, Lq, D = qs.shape
    lay = layout or Layout(qs.shape, ks.shape, None, causal, qs.device)
    o = _new((B, H, Lq, D), torch.float32, qs.device)
    stats = _new((4, B * H, Lq), torch.float32, qs.device)
    grad = bool(grad and reweight and _one_pass(qs.device))  # W and G serve only the one-pass backward
    w = _new((B, H, Lq, D), torch.float32, qs.device) if grad else o  # (o: a placeholder the kernel never writes)
    qk_dt, pv_dt, _ = _dot_types(v.dtype)
    _launch(lssa_fwd_kernel, "fwd", lay.max_q, lay.seqs.shape[0] * H,
            (qs, ks, v, o, stats, tau, w, lay.seqs, Lq, lay.LK, H, lay.G, offset_rows, float(p), B * H * Lq),
            dict(D=D, CAUSAL=causal, REWEIGHT=reweight, P_INT=_int_p(p), PM1_INT=_pm1(p), DEG=_degree(v.dtype),
                 QK_DT=qk_dt, PV_DT=pv_dt, GRAD=grad))
    return o, stats, (w if grad else None)


def _pm1(p: float) -> int:
    """p − 1 as an integer constexpr (see :func:`_int_p`), or -1 for the general power."""
    return _int_p(p) - 1 if _int_p(p) >= 1 else -1


def deterministic_backward() -> bool:
    """Whether the backward runs as two kernels without atomics (bitwise reproducible; one more recomputation of
    every attention element) instead of one pass with float32 atomics for dq: under
    ``torch.use_deterministic_algorithms(True)`` or with ``FREEATTEN_DETERMINISTIC=1``."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FREEATTEN_DETERMINISTIC", "0") == "1"


def _one_pass(device) -> bool:
    """Whether the backward runs in one pass: unless :func:`deterministic_backward`, and on Ampere or newer (and in
    the interpreter). Compiled for Ampere (sm_80) the one-pass kernel keeps 8 bytes of stack (4 spill instructions,
    none in its loops) and its loops cost fewer instructions per element than the two kernels' together (kernel
    report); GPUs before Ampere, which the report does not compile for, keep the two kernels."""
    if deterministic_backward():
        return False
    return INTERPRET or device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def lssa_bwd(qs, ks, v, o, do, stats, reweight: bool, causal: bool, p: float, offset_rows: int, w=None,
             layout: Layout | None = None):
    """Backward. Returns Σ_j dt_ij k̂_j (to be scaled by c_i·log2(e)), dk̂ (float32) and dv (v's dtype).

    One pass (:func:`lssa_bwd_kernel`, dq through float32 atomics) after a few per-row tensor operations here;
    LSSAR needs the forward's W (``lssa_fwd(..., grad=True)``). With :func:`deterministic_backward`, on GPUs older
    than Ampere (:func:`_one_pass`), or without W, the two kernels: the dQ kernel (also writes w_i·D_i, R_i and, for LSSA, dO/Z), then the dK/dV kernel."""
    B, H, Lq, D = qs.shape
    Hk, Lk = ks.shape[1], ks.shape[2]
    lay = layout or Layout(qs.shape, ks.shape, None, causal, qs.device)
    seqs, S = lay.seqs, lay.seqs.shape[0]
    do = do.contiguous()
    dev = qs.device
    dk = _new((B, Hk, Lk, D), torch.float32, dev)
    dv = _new((B, Hk, Lk, D), v.dtype, dev)
    qk_dt, pv_dt, ds_dt = _dot_types(v.dtype)
    prescale = _prescale(reweight, pv_dt)
    common = dict(D=D, CAUSAL=causal, REWEIGHT=reweight, PM1_INT=_pm1(p), DEG=_degree(v.dtype), QK_DT=qk_dt,
                  PV_DT=pv_dt, DS_DT=ds_dt, PRESCALE=prescale, GROUPED=lay.G > 1)
    # q̂ and k̂ once more in the dS products' operand type (see the kernels); the same tensor where they agree
    half = ds_dt == _DT_BF16 and qs.dtype != torch.bfloat16
    kd = ks.to(torch.bfloat16) if half else ks
    qd = qs.to(torch.bfloat16) if half else qs
    dos_dtype = torch.bfloat16 if pv_dt == _DT_BF16 else torch.float32
    if _one_pass(dev) and (w is not None or not reweight):
        dq = torch.zeros((B, H, Lq, D), dtype=torch.float32, device=dev)  # the atomics accumulate into it
        rows, dos = _bwd_rows(o, do, stats, w, reweight, prescale, p, offset_rows, lay.N, pv_dt, dos_dtype)
        _launch(lssa_bwd_kernel, "dkdv", lay.max_k, S * Hk,
                (qs, qd, ks, kd, v, dos, rows, dq, dk, dv, seqs, Lq, Lk, H, lay.G, float(p), B * H * Lq), common)
        return dq, dk, dv
    dq = _new((B, H, Lq, D), torch.float32, dev)
    delta = _new((B * H, Lq), torch.float32, dev)
    rterm = _new((B * H, Lq), torch.float32, dev)
    # LSSA: dO/Z, written by the dQ kernel for the dK/dV kernel (bfloat16 operands: stored so; else float32)
    dos = _new((B, H, Lq, D), dos_dtype, dev) if prescale else do
    _launch(lssa_bwd_dq_kernel, "dq", lay.max_q, S * H,
            (qs, ks, kd, v, o, do, dos, stats, dq, delta, rterm, seqs, Lq, Lk, H, lay.G, offset_rows, float(p),
             B * H * Lq), common)
    _launch(lssa_bwd_dkdv_kernel, "dkdv", lay.max_k, S * Hk,
            (qs, qd, ks, v, dos, stats, delta, rterm, dk, dv, seqs, Lq, Lk, H, lay.G, float(p), B * H * Lq), common)
    return dq, dk, dv


def _bwd_rows(o, do, stats, w, reweight, prescale, p, offset_rows, N, pv_dt, dos_dtype):
    """The per-row quantities of the one-pass backward, float32 [n, B·H·Lq] (see :func:`_bwd_tile`), and the dO
    operand it reads (dO/Z rounded to the operand type for LSSA with PRESCALE, else dO)."""
    B, H, Lq, D = o.shape
    iz = stats[0].view(B, H, Lq)
    dof = do.float()
    if prescale:  # D_i from the rounded dO/Z, so that dP − D stays an exact difference (see the dQ kernel)
        dos = _round_like_operand(dof * iz[..., None], pv_dt, dos_dtype)
        return (dos.float() * o).sum(-1).reshape(1, -1).contiguous(), dos
    delta = (dof * o).sum(-1)  # D_i = dO_i·o_i
    if not reweight:
        return torch.stack([iz * delta, iz]).reshape(2, -1).contiguous(), do
    a, b, G = (stats[r].view(B, H, Lq) for r in (1, 2, 3))
    lssar = a > 0
    N = N.to(torch.float32)[:, None, :]  # [B, 1, LQ]
    on = torch.where(N > offset_rows, 1.0 / N.clamp_min(1.0), torch.zeros_like(N))  # O_i / N_i
    wt = torch.where(lssar, p * a, iz)
    R = torch.where(lssar, on * p * a * ((dof * w).sum(-1) - delta * torch.where(lssar, G, 0.0)), 0.0)
    A = torch.where(lssar, a, iz)
    Bc = torch.where(lssar, b, 0.0)
    return torch.stack([wt * delta, wt, a, b, A, Bc, R]).reshape(7, -1).contiguous(), do


def _round_like_operand(x: torch.Tensor, pv_dt: int, dtype: torch.dtype) -> torch.Tensor:
    """float32 x rounded as the dot operand type rounds it (bfloat16 stored as such; the interpreter's emulated
    bfloat16 kept in float32; float32 unchanged)."""
    if pv_dt == _DT_BF16:
        return x.to(torch.bfloat16)
    if pv_dt == _DT_BF16_EMU:
        return x.to(torch.bfloat16).float()
    return x.to(dtype)


class LSSAFunction(torch.autograd.Function):
    """o = LSSA / LSSAR(q̂, k̂, v) with fused forward and backward kernels (q̂, k̂: float32 unit vectors; k̂, v may
    have fewer heads than q̂; ``seqs``: sequence descriptors or None, see :func:`attention`)."""

    @staticmethod
    def forward(ctx, qh, kh, v, reweight: bool, causal: bool, p: float, offset_rows: int, seqs=None):
        lay = Layout(qh.shape, kh.shape, seqs, causal, qh.device)
        c2, tau = lay.row_constants()
        kdt = torch.float32 if v.dtype == torch.float32 else torch.float16  # see the module docstring
        qs = (qh * c2[:, None, :, None]).to(kdt).contiguous()  # the scale folded into q̂ once per row
        ks, v = kh.to(kdt).contiguous(), v.contiguous()
        o, stats, w = lssa_fwd(qs, ks, v, tau, reweight, causal, p, offset_rows,
                               grad=any(ctx.needs_input_grad[:3]), layout=lay)
        ctx.save_for_backward(qs, ks, v, o, stats, c2, w)
        ctx.args = (reweight, causal, p, offset_rows)
        ctx.layout = lay
        return lay.zero_outside(o).to(v.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        qs, ks, v, o, stats, c2, w = ctx.saved_tensors
        reweight, causal, p, offset_rows = ctx.args
        lay = ctx.layout
        bad_do = None
        if not bool(torch.isfinite(do).all()):  # see _nan_in_grad_output: the kernels see only finite numbers
            bad_do = ~torch.isfinite(do)
            do = do.masked_fill(bad_do, 0)
        dq, dk, dv = lssa_bwd(qs, ks, v, o, do, stats, *ctx.args, w=w, layout=lay)
        dq = lay.zero_outside(dq) * c2[:, None, :, None]
        dk, dv = lay.zero_outside(dk, keys=True), lay.zero_outside(dv, keys=True)
        if bad_do is not None:
            dq, dk, dv = _nan_in_grad_output(bad_do, dq, dk, dv, _visibility(lay, causal))
        return dq, dk, dv, None, None, None, None, None


def _visibility(lay: Layout, causal: bool):
    """The visibility the reference's NaN-policy helpers take: ``causal`` for a dense call, else [B, 1, LQ, LK]."""
    if lay.q_rows is None:
        return causal
    from .batching import seqs_visibility

    return seqs_visibility(lay.seqs, lay.B, lay.LQ, lay.LK, causal)


def _nan_in_grad_output(bad_do, dq, dk, dv, causal):
    """A non-finite cotangent dO_id (the kernels ran with 0 in its place) makes NaN exactly the gradients that
    depend on it: dq of row i, dk of every key row i sees, dv_jd of every such key (column d only). Off the
    fast path, so the [Lq, Lk] visibility matrix of the reference is fine here."""
    vis = reference.visibility(dq.shape[-2], dk.shape[-2], causal, device=dq.device)
    B, H, Hk = dq.shape[0], dq.shape[1], dk.shape[1]
    rows = bad_do.any(dim=-1)  # [B, H, Lq]
    nan = float("nan")
    dq = dq.masked_fill(rows[..., None], nan)
    # keys reached from the rows of any query head of the group (grouped queries: G heads read one key head)
    reach_k = reference._reach(rows, vis).expand(B, H, dk.shape[2]).reshape(B, Hk, -1, dk.shape[2]).any(2)
    reach_v = reference._reach(bad_do, vis).expand(B, H, *dv.shape[2:]).reshape(B, Hk, -1, *dv.shape[2:]).any(2)
    dk = dk.masked_fill(reach_k[..., None], nan)
    dv = dv.masked_fill(reach_v, nan)
    return dq, dk, dv


SUPPORTS_SEQS = True
"""The kernels take grouped-query K/V and sequence descriptors (``seqs``), see :func:`attention`."""


def check_seqs(seqs, q, k, causal: bool) -> torch.Tensor:
    """``seqs`` as an int32 [S, 5] tensor on q's device, or a ValueError/TypeError naming the problem: each row
    (batch, q_start, q_end, k_start, k_end) within the tensors, non-empty, Lq <= Lk per sequence when causal,
    and the sequences of one batch element disjoint in both query and key rows."""
    B, LQ, LK = q.shape[0], q.shape[2], k.shape[2]
    if not isinstance(seqs, torch.Tensor) or seqs.dtype not in (torch.int32, torch.int64) or seqs.ndim != 2 \
            or seqs.shape[1] != 5:
        raise ValueError(f"seqs must be an int32/int64 tensor [S, 5] of (batch, q_start, q_end, k_start, k_end), "
                         f"got {type(seqs).__name__} {getattr(seqs, 'dtype', '')} {tuple(getattr(seqs, 'shape', ()))}")
    if seqs.shape[0] == 0:
        raise ValueError("seqs is empty: at least one sequence is needed")
    t = seqs.detach().to("cpu", torch.int64)
    b, q0, q1, k0, k1 = t.unbind(1)
    bad = (b < 0) | (b >= B) | (q0 < 0) | (q1 > LQ) | (q1 <= q0) | (k0 < 0) | (k1 > LK) | (k1 <= k0)
    if causal:
        bad |= (q1 - q0) > (k1 - k0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"seqs row {i} = {t[i].tolist()} is not a sequence of q {tuple(q.shape)} / k "
                         f"{tuple(k.shape)}: need 0 <= batch < {B}, 0 <= q_start < q_end <= {LQ}, 0 <= k_start < "
                         f"k_end <= {LK}" + (", and no more query rows than key rows (causal)" if causal else ""))
    for lo, hi, what in ((q0, q1, "query"), (k0, k1, "key")):
        order = torch.argsort(b * (LQ + LK + 1) + lo)
        same = b[order][1:] == b[order][:-1]
        if (same & (lo[order][1:] < hi[order][:-1])).any():
            raise ValueError(f"seqs: two sequences of one batch element share {what} rows")
    return seqs.to(device=q.device, dtype=torch.int32).contiguous()


def attention(q, k, v, method: str, causal: bool, p: float = 15.0, offset_rows: int = 3,
              seqs: torch.Tensor | None = None) -> torch.Tensor:
    """LSSA (``method="lssa"``) or LSSAR (``"lssar"``) through the fused kernels; the result has q's dtype.

    q [B, H, LQ, D], k/v [B, H_kv, LK, D] with H a multiple of H_kv (grouped-query attention: query head h reads
    key head h // (H / H_kv); K and V are never repeated in memory); causal uses bottom-right alignment.
    ``seqs`` (optional): sequence descriptors, an integer tensor [S, 5] of rows (batch, q_start, q_end, k_start,
    k_end): sequence s is the query rows [q_start, q_end) and key rows [k_start, k_end) of batch element
    ``batch``, bottom-right aligned within itself (query row r sees key j iff k_start <= j < k_end and, causal,
    j − k_start <= (r − q_start) + (k_end − k_start) − (q_end − q_start)), and N_i counts only its keys. Query
    rows in no sequence output 0 and key rows in none get zero gradients. Without it: one sequence per batch
    element, (b, 0, LQ, 0, LK). Padding masks and packed batches reach this form through
    :mod:`.batching`. The unit-sphere normalisation (:func:`.reference.unit`: scaled by the row's largest entry
    first, so it neither overflows nor underflows; a zero vector maps to 0) runs in PyTorch (float32) so
    autograd carries the gradient of q̂, k̂ back to q, k. ``p`` must not exceed :data:`P_MAX`.
    """
    if method not in ("lssa", "lssar"):
        raise ValueError(f"the fused kernels implement 'lssa' and 'lssar', not {method!r}")
    if method == "lssar" and not (1.0 <= float(p) <= P_MAX):
        raise ValueError(f"p must lie in [1, P_MAX = {P_MAX:g}] for the fused kernels, got {p!r}: above P_MAX the "
                         f"float32 gradients of the re-weighting carry a relative error of about p·1.2e-7 times "
                         f"the row's conditioning and become noise")
    why = unsupported_reason(q, k, v, explicit=True)
    if why is not None:
        raise ValueError(f"the fused kernels cannot run this call: {why}")
    H, Hk = q.shape[1], k.shape[1]
    if Hk < 1 or H % Hk or v.shape[:3] != k.shape[:3] or k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must be [B, H_kv, Lk, D] with the batch of q and H_kv dividing its {H} heads, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if seqs is not None:
        seqs = check_seqs(seqs, q, k, bool(causal))
    elif causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs Lq <= Lk (queries are aligned to the last keys), got "
                         f"Lq={q.shape[2]} > Lk={k.shape[2]}")
    args = (method == "lssar", bool(causal), float(p), int(offset_rows), seqs)
    if reference._all_finite(q, k, v):
        return LSSAFunction.apply(reference.unit(q.float()), reference.unit(k.float()), v, *args)
    # NaN / ±Inf in an input: the kernels run on the finite part (non-finite elements replaced by 0) and the
    # reference's policy wrapper marks NaN exactly the outputs, and in backward the gradients, that depend on a
    # non-finite element (decisions page, "NaN and Inf"). The kernels' loops thus never handle non-finite
    # numbers; the all-finite check costs one reduction over q, k, v per call (and over dO in backward).
    fq, fk, fv = (reference._finite(t) for t in (q, k, v))
    o = LSSAFunction.apply(reference.unit(fq.float()), reference.unit(fk.float()), fv, *args)
    vis = _visibility(Layout(q.shape, k.shape, seqs, bool(causal), q.device), bool(causal))
    return reference._NanPolicy.apply(o, q, k, v, reference._bad_outputs(q, k, v, vis), vis, method)


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


__all__ = ["attention", "unsupported_reason", "check_seqs", "Layout", "SUPPORTS_SEQS", "LSSAFunction", "lssa_fwd",
           "lssa_bwd", "poison_outputs",
           "emulate_gpu_dots",
           "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES", "INTERPRET"]


def report_cases(D: int, dtype: str, causal: bool) -> list[dict]:
    """The kernel report's configurations (see :mod:`freeatten_core.kernel_report`): the kernels as a GPU launch
    with ``dtype`` inputs compiles them (p = 15) in :data:`TILES`, and the softmax yardsticks in the same tiles."""
    from . import yardstick_kernels

    dt = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    tdt = getattr(torch, dtype)
    qk = "fp32" if dt == "fp32" else "fp16"
    qk_dt, pv_dt, ds_dt = (_DT_F32,) * 3 if dt == "fp32" else (_DT_F16, _DT_BF16 if dt == "bf16" else _DT_F16,
                                                               _DT_BF16)
    i32, f32 = "i32", "fp32"
    dims = dict(seqs="*i32", LQ=i32, LK=i32, H=i32, G=i32)
    out = []

    def case(name, kernel, kind, sig, const, loops):
        bm, bn, w, st = TILES[kind]
        out.append(dict(name=name, module=__name__, kernel=kernel, signature=sig, BM=bm, BN=bn, num_warps=w,
                        num_stages=st, constexprs=dict(const, BM=bm, BN=bn), loops=loops, D=D, dtype=dtype,
                        causal=causal, budget_of=name))

    for rw in (False, True):
        m = "lssar" if rw else "lssa"
        base = dict(D=D, CAUSAL=causal, REWEIGHT=rw, DEG=_degree(tdt), QK_DT=qk_dt, PV_DT=pv_dt)
        pre = _prescale(rw, pv_dt)
        dsd = "fp32" if dt == "fp32" else "bf16"
        dos = ("bf16" if pv_dt == _DT_BF16 else "fp32") if pre else dt
        # the forward as training runs it (LSSAR: with W and G for the one-pass backward)
        case(f"{m}_fwd", "lssa_fwd_kernel", "fwd",
             dict(q="*" + qk, k="*" + qk, v="*" + dt, o="*fp32", stats="*fp32", tau="*fp32", w="*fp32", **dims,
                  offset_rows=i32, P=f32, n_rows=i32),
             dict(base, P_INT=15, PM1_INT=14, GRAD=rw),
             ["pass1_full", "pass1_edge", "pass2_full", "pass2_edge"] if rw else ["full", "edge"])
        if rw:  # and as inference runs it (no W, G: y^p alone)
            case("lssar_fwd_infer", "lssa_fwd_kernel", "fwd", out[-1]["signature"], dict(base, P_INT=15, PM1_INT=14,
                 GRAD=False), ["pass1_full", "pass1_edge", "pass2_full", "pass2_edge"])
        case(f"{m}_dq", "lssa_bwd_dq_kernel", "dq",
             dict(q="*" + qk, k="*" + qk, kd="*" + dsd, v="*" + dt, o="*fp32", do="*" + dt, dos="*" + dos,
                  stats="*fp32", dq="*fp32", delta="*fp32", rterm="*fp32", **dims, offset_rows=i32, P=f32,
                  n_rows=i32),
             dict(base, PM1_INT=14, DS_DT=ds_dt, PRESCALE=pre, GROUPED=False), ["full", "edge"])
        case(f"{m}_dkdv", "lssa_bwd_dkdv_kernel", "dkdv",
             dict(q="*" + qk, qd="*" + dsd, k="*" + qk, v="*" + dt, do="*" + dt,
                  stats="*fp32", delta="*fp32", rterm="*fp32",
                  dk="*fp32", dv="*" + dt, **dims, P=f32, n_rows=i32),
             dict(base, PM1_INT=14, DS_DT=ds_dt, PRESCALE=pre, GROUPED=False), ["edge", "full"])
        case(f"{m}_bwd", "lssa_bwd_kernel", "dkdv",
             dict(q="*" + qk, qd="*" + dsd, k="*" + qk, kd="*" + dsd, v="*" + dt, do="*" + dos, rows="*fp32",
                  dq="*fp32", dk="*fp32", dv="*" + dt, **dims, P=f32, n_rows=i32),
             dict(base, PM1_INT=14, DS_DT=ds_dt, PRESCALE=pre, GROUPED=False), ["edge", "full"])
    # grouped queries (G > 1): the key-side loops run over (query head, tile); shown, not budgeted
    gqa = dict(out[-1], name="lssar_bwd_gqa", constexprs=dict(out[-1]["constexprs"], GROUPED=True),
               budget_of="lssar_bwd_gqa")
    return out + [gqa] + yardstick_kernels.report_cases(D, dtype, causal, TILES)
