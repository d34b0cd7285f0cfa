"""A split-key decoding kernel for LSSA / LSSAR: a few query rows (``Lq <= 16``) against a long KV cache, forward only.

With one to sixteen queries per sequence there are too few query rows to keep a GPU busy with one program per
row block (the forward kernel's grid), so the keys are split instead (flash-decoding): the cache is cut into
chunks, one program per (chunk, row block, batch, key head) reduces its chunk to per-row partial sums, and a small
step sums the partials over the chunks. LSSA and LSSAR normalise by plain sums, not by a running maximum, so
partial sums add up without any rescaling:

* LSSA, one round: per chunk ``(Σ_j f_ij v_j, Σ_j f_ij)``; ``o_i = Σ f v / Σ f``.
* LSSAR, two rounds. Round 1: per chunk ``Z_i = Σ_j f_ij`` and ``T_i = max_j t_ij``; combined, they give the row
  constants ``M_i = N_i F_i / Z_i − O_i`` (``F_i = f(T_i)``), ``a_i = N_i / (N_i F_i − O_i Z_i)`` and
  ``b_i = O_i Z_i / (N_i F_i − O_i Z_i)``. Round 2: per chunk ``(Σ u v, Σ u)`` with
  ``u = ReLU(a_i f_ij − b_i)^p ∈ [0, 1]`` (rows with ``M_i ≤ τ_i``, uniform up to rounding, keep ``u = f``, as in
  :func:`.reference.reweight`); ``o_i = Σ u v / Σ u``.

Here ``f = log2(1 + 2^t) = softplus(s)/ln 2`` with ``t = s·log2(e)`` (the ℓ1 normalisation and the re-weighting
are blind to the factor), ``s_ij = c_i q̂_i·k̂_j`` and ``c_i = ln(d)·ln(N_i)``.

Grouped queries: the ``G = H / H_kv`` query heads of a key head are folded into the row dimension (``G·Lq``
rows), so the group's queries are rows of the same programs and read each K/V tile together. Padding: per batch
element the real keys are ``[start_b, end_b)`` (left or right padding); a query row at key position
``r + Lk − Lq`` sees the keys ``start_b <= j < end_b`` (and ``j <= r + Lk − Lq`` when causal), a query at a padding
position outputs 0. Chunks outside ``[start_b, end_b)`` are skipped. The cache is read through its strides (a
slice of a preallocated cache is not copied); the normalisations ``q̂ = q/‖q‖`` and ``k̂ = k/‖k‖`` happen
on the tiles in registers, after division by the largest ``|x_d|`` (as :func:`.reference.unit`, so that ``‖x‖²``
cannot overflow).

Launches per step: LSSA two (the chunks; the combine), LSSAR three (round 1; round 2, whose programs first sum
round 1's partials of their rows into the row constants; the combine). Nothing else runs on the device between
them, so a step costs no host-side tensor arithmetic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import reference

# the interpreter flag, the test hooks (NaN-poisoned buffers, the GPU's operand rounding emulated) and the device
# helpers are the fused kernels' own: one switch serves both kernel families
from .triton_kernels import (INTERPRET, MAX_INT_P, SUPPORTED_DTYPES, _degree, _new, _pow,  # noqa: E402, F401
                             _round_bf16, _softplus2, emulate_gpu_dots, poison_outputs)
from . import triton_kernels as _tk  # noqa: E402

MAX_QUERIES = 16


@triton.jit
def _unit_rows(x):
    # x/‖x‖ per row, after division by the row's largest |entry| (so ‖x‖² cannot overflow); a zero row stays 0
    m = tl.max(tl.abs(x), 1)
    x = x * (1.0 / tl.where(m > 0, m, 1.0))[:, None]
    nrm = tl.sqrt(tl.sum(x * x, 1))
    return x * tl.where(nrm > 0, 1.0 / tl.where(nrm > 0, nrm, 1.0), 0.0)[:, None]


@triton.jit
def _row_geometry(i_b, o_m, m_m, Lq, Lk, start, end, CAUSAL: tl.constexpr, HAS_SPAN: tl.constexpr):
    # folded row m is query row r = m % Lq at key position r + Lk − Lq: it sees the keys [lo, hi) (hi = lo when
    # it sees none: a query at a padding position)
    r = o_m % Lq
    pos = r + (Lk - Lq)
    if HAS_SPAN:
        lo = tl.load(start + i_b + o_m * 0, mask=m_m, other=0)
        hi = tl.load(end + i_b + o_m * 0, mask=m_m, other=0)
        real = (pos >= lo) & (pos < hi)
    else:
        lo = o_m * 0
        hi = o_m * 0 + Lk
        real = o_m >= 0
    if CAUSAL:
        hi = tl.minimum(hi, pos + 1)
    hi = tl.where(real & (hi > lo) & m_m, hi, lo)
    return lo, hi


@triton.jit
def _n_bad(x):
    # the number of non-finite elements of a tile (NaN != NaN; |±inf| == inf)
    return tl.sum(tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), 1), 0)


@triton.jit
def _scores(b_q, k_ptr, s_kn, o_j, j_end, b_lo, b_hi, D: tl.constexpr, HALF: tl.constexpr):
    # [BM, BN] t_ij = q̃_i·k̂_j for keys o_j, −inf where row i does not see key j. b_q: q̃ (float16 when HALF).
    # HALF: 0 exact float32 dots; 1 half-precision operands on the tensor cores; 2 their rounding emulated.
    # k̂ = (k/m)/‖k/m‖ with m = max_d |k_d|: the dot takes k/m (entries in [-1, 1], fit for float16) and the scores
    # are scaled by 1/‖k/m‖ afterwards, one multiply per score instead of one per key element. Also the number
    # of keys of the tile with a non-finite element (k/m then holds a NaN, so does ‖k/m‖²).
    o_d = tl.arange(0, D)
    b_k = tl.load(k_ptr + o_j[:, None] * s_kn + o_d[None, :], mask=(o_j < j_end)[:, None], other=0.0).to(tl.float32)
    m = tl.max(tl.abs(b_k), 1)  # [BN]
    b_k = b_k * (1.0 / tl.where(m > 0, m, 1.0))[:, None]
    ss = tl.sum(b_k * b_k, 1)  # [BN], in [1, D] for a non-zero finite key
    n_bad = tl.sum(((ss != ss) | (ss == float("inf"))).to(tl.int32), 0)
    rn = tl.where(ss > 0, 1.0 / tl.sqrt(tl.where(ss > 0, ss, 1.0)), 0.0)  # a zero key has no direction: 0
    if HALF == 1:
        b_t = tl.dot(b_q, tl.trans(b_k.to(tl.float16)))
    elif HALF == 2:
        b_t = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float16).to(tl.float32)), input_precision="ieee")
    else:
        b_t = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    b_t = b_t * rn[None, :]
    vis = (o_j[None, :] >= b_lo[:, None]) & (o_j[None, :] < b_hi[:, None]) & (o_j < j_end)[None, :]
    return tl.where(vis, b_t, float("-inf")), n_bad


@triton.jit
def _values(v_ptr, s_vn, o_j, j_end, D: tl.constexpr):
    o_d = tl.arange(0, D)
    return tl.load(v_ptr + o_j[:, None] * s_vn + o_d[None, :], mask=(o_j < j_end)[:, None], other=0.0)


@triton.jit
def _pv(b_w, b_v, HALF: tl.constexpr):
    # Σ_j w_ij v_j: half-precision values stay in their dtype on the tensor cores (w cast to it), float32 exact
    if HALF == 1:
        r = tl.dot(b_w.to(b_v.dtype), b_v)
    elif HALF == 2:
        if b_v.dtype == tl.bfloat16:
            b_w = _round_bf16(b_w)
        else:
            b_w = b_w.to(tl.float16).to(tl.float32)
        r = tl.dot(b_w, b_v.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(b_w, b_v.to(tl.float32), input_precision="ieee")
    return r


@triton.jit
def lss_decode_kernel(
    q, k, v, start, end, part_z, part_m, part_s, part_acc, bad,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    Hkv, Lq, Lk, R, chunk, n_chunks, offset_rows, P, LN_D, TAU0, TAU_C, TAU_N,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_SPAN: tl.constexpr,
    ROUND: tl.constexpr, REWEIGHT: tl.constexpr, P_INT: tl.constexpr, HALF: tl.constexpr, DEG: tl.constexpr,
):
    # One program: BM folded query rows of one (batch, key head) against the keys of one chunk. Folded row m of key
    # head h is query row m % Lq of query head h·G + m // Lq (R = G·Lq rows). q, k, v are read through their
    # strides (last dim contiguous); start/end [B] the real keys of each batch element (HAS_SPAN).
    # Round 1 writes per (chunk, row) part_z = Σ f and, for LSSAR, part_m = max t; LSSA also part_acc = Σ f·v.
    # Round 2 (LSSAR) first forms each row's constants from every chunk's part_z and part_m, then writes
    # part_s = Σ u and part_acc = Σ u·v. Every program adds to `bad` a positive count when anything it read was
    # non-finite (a key through ‖k/m‖², a value through its column of acc, q directly): the host then knows,
    # without reading the cache again, whether the NaN policy has to take over.
    i_c = tl.program_id(0)
    i_m = tl.program_id(1)
    i_bh = tl.program_id(2)
    n_bh = tl.num_programs(2)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    o_d = tl.arange(0, D)
    m_m = o_m < R
    b_lo, b_hi = _row_geometry(i_b, o_m, m_m, Lq, Lk, start, end, CAUSAL, HAS_SPAN)
    b_N = (b_hi - b_lo).to(tl.float32)
    b_c = tl.where(b_N > 0, LN_D * tl.log(tl.maximum(b_N, 1.0)), 0.0)  # c_i = ln d · ln N_i
    # q̃ = c·log2(e)·q̂, normalised in registers
    p_q = q + i_b.to(tl.int64) * s_qb + (i_h * (R // Lq) + o_m // Lq).to(tl.int64)[:, None] * s_qh \
        + (o_m % Lq)[:, None] * s_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0).to(tl.float32)
    n_bad = _n_bad(b_q)
    b_q = _unit_rows(b_q) * (b_c * 1.4426950408889634)[:, None]
    if HALF != 0:  # the dot operand, converted once
        b_q = b_q.to(tl.float16)
    k_ptr = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    v_ptr = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    p_s = (i_c * n_bh + i_bh).to(tl.int64) * R + o_m  # [BM] into the [n_chunks, B·Hkv, R] partials
    if ROUND == 2:
        # the row constants of the re-weighting, as the forward kernel forms them: M = N·F/Z − O > τ (else the
        # row keeps u = f); y = x/M = a·f − b with a = N/(N·F − O·Z), b = O·Z/(N·F − O·Z)
        b_Z = tl.zeros([BM], dtype=tl.float32)
        b_T = tl.full([BM], float("-inf"), tl.float32)
        for c in range(0, n_chunks):
            p_c = (c * n_bh + i_bh).to(tl.int64) * R + o_m
            b_Z += tl.load(part_z + p_c, mask=m_m, other=0.0)
            b_T = tl.maximum(b_T, tl.load(part_m + p_c, mask=m_m, other=float("-inf")))
        b_F = _softplus2(b_T, DEG)
        b_O = tl.where(b_N > offset_rows, 1.0, 0.0)
        b_den = b_N * b_F - b_O * b_Z
        b_tau = TAU0 + TAU_C * b_c + TAU_N * b_N  # reference.uniform_threshold(c, N, D, float32), see `decode`
        ok = b_den > b_tau * b_Z
        b_rden = 1.0 / tl.where(ok, b_den, 1.0)
        b_a = tl.where(ok, b_N * b_rden, 0.0)
        b_b = tl.where(ok, b_O * b_Z * b_rden, 0.0)
    # the chunk's keys, narrowed to those some row of the block sees (skips padding and the causal tail)
    j_lo = tl.maximum(i_c * chunk, tl.min(tl.where(m_m, b_lo, 2147483647), 0))
    j_end = tl.minimum(i_c * chunk + chunk, tl.max(tl.where(m_m, b_hi, 0), 0))
    b_s = tl.zeros([BM], dtype=tl.float32)
    b_mx = tl.full([BM], float("-inf"), tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for j0 in range(j_lo, j_end, BN):
        o_j = j0 + tl.arange(0, BN)
        b_t, nb = _scores(b_q, k_ptr, s_kn, o_j, j_end, b_lo, b_hi, D, HALF)  # [BM, BN]
        n_bad += nb
        b_f = _softplus2(b_t, DEG)
        if REWEIGHT and ROUND == 1:  # Z and max t only
            b_s += tl.sum(b_f, 1)
            b_mx = tl.maximum(b_mx, tl.max(b_t, 1))
        else:
            if REWEIGHT:  # round 2: u = ReLU(a·f − b)^p on re-weighted rows (a > 0), u = f on the others
                b_u = _pow(tl.maximum(b_a[:, None] * b_f - b_b[:, None], 0.0), P, P_INT)
                b_w = tl.where((b_a > 0)[:, None], b_u, b_f)
            else:
                b_w = b_f
            b_s += tl.sum(b_w, 1)
            b_acc += _pv(b_w, _values(v_ptr, s_vn, o_j, j_end, D), HALF)
    if not (REWEIGHT and ROUND == 1):  # a non-finite value poisons its column of acc (0·NaN = 0·inf = NaN)
        n_bad += _n_bad(b_acc)
    tl.atomic_add(bad, n_bad)
    if ROUND == 1:
        tl.store(part_z + p_s, b_s, mask=m_m)
    else:
        tl.store(part_s + p_s, b_s, mask=m_m)
    if REWEIGHT and ROUND == 1:
        tl.store(part_m + p_s, b_mx, mask=m_m)
    else:
        tl.store(part_acc + p_s[:, None] * D + o_d[None, :], b_acc, mask=m_m[:, None])


@triton.jit
def lss_decode_combine_kernel(part_s, part_acc, o, Hkv, Lq, R, n_chunks, D: tl.constexpr, BM: tl.constexpr):
    # o = Σ_chunks acc / Σ_chunks s for BM folded rows of one (batch, key head); o [B, H, Lq, D] contiguous. A row
    # with s = 0 sees no key (a padding query) and gets 0.
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_m = o_m < R
    b_s = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for c in range(0, n_chunks):
        p_c = (c * n_bh + i_bh).to(tl.int64) * R + o_m
        b_s += tl.load(part_s + p_c, mask=m_m, other=0.0)
        b_acc += tl.load(part_acc + p_c[:, None] * D + o_d[None, :], mask=m_m[:, None], other=0.0)
    b_o = b_acc / tl.where(b_s > 0, b_s, 1.0)[:, None]
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    row = ((i_b * Hkv + i_h) * (R // Lq) + o_m // Lq).to(tl.int64) * Lq + o_m % Lq  # [B, H, Lq] row index
    tl.store(o + row[:, None] * D + o_d[None, :], b_o.to(o.dtype.element_ty), mask=m_m[:, None])


# --------------------------------------------------------------------------------------------------------
# Host code
# --------------------------------------------------------------------------------------------------------


def unsupported_reason(q, k, v) -> str | None:
    """Why the decoding kernel cannot run this call (None: it can). The API asks only for calls with at most
    ``MAX_QUERIES`` query rows that need no gradient."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the decoding kernel (float32, float16, bfloat16)"
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        return f"head dim {D} is not supported by the decoding kernel (a power of two from 16 to 256)"
    if q.shape[-2] > MAX_QUERIES:
        return f"the decoding kernel takes at most {MAX_QUERIES} query rows, got {q.shape[-2]}"
    if not q.is_cuda and not INTERPRET:
        return "the decoding kernel needs a CUDA device or the Triton interpreter (TRITON_INTERPRET=1)"
    return None


def _row_ranges(B, Lq, Lk, causal, start, end, device):
    """int32 ``[B, Lq]`` ``(lo, hi)``: the keys ``[lo, hi)`` query row r sees, and float64 ``[B, Lq]`` N = hi − lo
    (0 for a query at a padding position)."""
    r = torch.arange(Lq, device=device)[None, :]
    if start is None:
        lo = torch.zeros(B, Lq, dtype=torch.int64, device=device)
        hi = torch.full((B, Lq), Lk, dtype=torch.int64, device=device)
        real = torch.ones(B, Lq, dtype=torch.bool, device=device)
    else:
        start = start.to(device=device, dtype=torch.int64)[:, None]
        end = end.to(device=device, dtype=torch.int64)[:, None]
        pos = r + (Lk - Lq)
        real = (pos >= start) & (pos < end)
        lo, hi = start.expand(B, Lq), end.expand(B, Lq)
    if causal:
        hi = torch.minimum(hi, r + (Lk - Lq) + 1)
    hi = torch.where(real & (hi > lo), hi, lo)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(), (hi - lo).to(torch.float64)


def _tau_coefficients(D: int) -> tuple[float, float, float]:
    """LSSAR's uniform-row threshold τ_i = τ0 + τc·c_i + τn·N_i (float32 rows), read off
    :func:`.reference.uniform_threshold` (affine in the score bound c_i and in N_i), so that the kernel holds no
    second copy of its constants."""
    t0 = float(reference.uniform_threshold(0.0, 0.0, D, torch.float32))
    return (t0, float(reference.uniform_threshold(1.0, 0.0, D, torch.float32)) - t0,
            float(reference.uniform_threshold(0.0, 1.0, D, torch.float32)) - t0)


def _half(dtype: torch.dtype) -> int:
    """The HALF constexpr: 0 float32 dots (float32 inputs; the interpreter), 1 half-precision dot operands (half
    inputs on a GPU), 2 their rounding emulated in the interpreter (:func:`emulate_gpu_dots`)."""
    if dtype == torch.float32:
        return 0
    if INTERPRET:
        return 2 if _tk._EMULATE_GPU_DOTS else 0
    return 1


def _tiles(R: int, D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BM, BN, num_warps). On a GPU: 16 folded rows per program (more rows are more row blocks, whose programs
    read the same K/V tiles at the same time, mostly from L2) and key tiles that compile for sm_90a without register
    spills (compiled by the kernel report's ``build_report(head_dims=(64, 128, 256), dtypes=("bfloat16",
    "float32"), only={"decode_lssar_round1", "decode_lssar_round2"})``; float32 at D = 256 keeps an 8-byte stack
    frame). The interpreter: up to 64 rows and 16 keys per tile (its cost grows
    with the number of programs and tile iterations, not with their size)."""
    if INTERPRET:
        return min(64, max(16, triton.next_power_of_2(R))), 16, 4
    if dtype == torch.float32:
        return 16, (16 if D >= 128 else 32), 8 if D >= 128 else 4
    return 16, (64 if D <= 128 else 32), 8 if D >= 128 else 4


def _chunking(Lk: int, n_prog: int, device, chunk: int | None, BN: int) -> int:
    """Keys per chunk, a multiple of BN: enough chunks for about two programs per multiprocessor on a GPU."""
    if chunk is not None:
        return max(BN, triton.cdiv(chunk, BN) * BN)
    if INTERPRET or device.type != "cuda":
        target = 2  # the interpreter: few programs, but more than one chunk so that the combine step is exercised
    else:
        target = max(1, 2 * torch.cuda.get_device_properties(device).multi_processor_count // max(1, n_prog))
    return max(BN, triton.cdiv(triton.cdiv(Lk, target), BN) * BN)


def decode(q, k, v, reweight: bool, causal: bool, start=None, end=None, p: float = 15.0, offset_rows: int = 3,
           chunk: int | None = None):
    """The kernel launches: ``(o, bad)``, o ``[B, H, Lq, D]`` in q's dtype and ``bad`` (int32 ``[1]``), 0 when every
    value the kernels read was finite (o is valid only then). ``start``/``end``: ``[B]`` real keys per batch
    element (None: all); ``chunk``: keys per program (None: chosen for the device). Two launches for LSSA (the
    chunks, the combine), three for LSSAR."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    R = (H // Hkv) * Lq
    dev = q.device
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    has_span = start is not None
    if has_span:
        start = start.to(device=dev, dtype=torch.int32).contiguous()
        end = end.to(device=dev, dtype=torch.int32).contiguous()
    else:
        start = end = torch.zeros(1, dtype=torch.int32, device=dev)  # not read
    BM, BN, warps = _tiles(R, D, q.dtype)
    n_m = triton.cdiv(R, BM)
    ck = _chunking(Lk, n_m * B * Hkv, dev, chunk, BN)
    n_c = triton.cdiv(Lk, ck)
    f32 = torch.float32
    part_z = _new((n_c, B * Hkv, R), f32, dev)
    part_acc = _new((n_c, B * Hkv, R, D), f32, dev)
    part_m = _new((n_c, B * Hkv, R), f32, dev) if reweight else part_z
    part_s = _new((n_c, B * Hkv, R), f32, dev) if reweight else part_z
    o = _new((B, H, Lq, D), q.dtype, dev)
    bad = torch.zeros(1, dtype=torch.int32, device=dev)
    args = (q, k, v, start, end, part_z, part_m, part_s, part_acc, bad,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            Hkv, Lq, Lk, R, ck, n_c, int(offset_rows), float(p), math.log(D), *_tau_coefficients(D))
    p_int = int(p) if float(p).is_integer() and 1 <= p <= MAX_INT_P else -1
    meta = dict(D=D, BM=BM, BN=BN, CAUSAL=bool(causal), HAS_SPAN=has_span, REWEIGHT=reweight, P_INT=p_int,
                HALF=_half(q.dtype), DEG=_degree(q.dtype), num_warps=warps, num_stages=2)
    grid = (n_c, n_m, B * Hkv)
    lss_decode_kernel[grid](*args, ROUND=1, **meta, **_tk.COMPILE_OPTIONS)
    if reweight:
        lss_decode_kernel[grid](*args, ROUND=2, **meta, **_tk.COMPILE_OPTIONS)
    lss_decode_combine_kernel[(n_m, B * Hkv)](part_s, part_acc, o, Hkv, Lq, R, n_c, D=D, BM=BM,
                                              **_tk.COMPILE_OPTIONS)
    return o, bad


def attention(q, k, v, method: str, causal: bool, start=None, end=None, p: float = 15.0, offset_rows: int = 3,
              chunk: int | None = None) -> torch.Tensor:
    """LSSA or LSSAR for decoding, forward only: ``q`` ``[B, H, Lq <= 16, D]``, ``k``/``v`` ``[B, H_kv, Lk, D]``.

    ``start``/``end`` (``[B]`` integers, both or neither): the real keys of each batch element are
    ``[start_b, end_b)``; queries at padding positions output 0. Non-finite inputs follow the package's NaN policy:
    the kernels flag non-finite values among those they read (one integer; the cache is not read a second time
    for a check), and when there are any the step runs again on the finite part of the inputs and the reference's policy
    marks the outputs that depend on a non-finite element. No gradient flows through this function: the API calls
    it only when none is needed.
    """
    if method not in ("lssa", "lssar"):
        raise ValueError(f"the decoding kernel implements 'lssa' and 'lssar', not {method!r}")
    why = unsupported_reason(q, k, v)
    if why is not None:
        raise ValueError(f"the decoding kernel cannot run this call: {why}")
    if (start is None) != (end is None):
        raise ValueError("give both start and end (the real keys [start_b, end_b) of each batch element) or neither")
    with torch.no_grad():
        args = (method == "lssar", bool(causal), start, end, float(p), int(offset_rows), chunk)
        o, bad = decode(q, k, v, *args)
        if int(bad) == 0:  # everything the kernels read was finite (keys no row sees are never read)
            return o
        fq, fk, fv = (reference._finite(t) for t in (q, k, v))
        o, _ = decode(fq, fk, fv, *args)
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
        lo, hi, _ = _row_ranges(B, Lq, Lk, causal, start, end, q.device)
        j = torch.arange(Lk, device=q.device)
        vis = ((j >= lo[..., None].long()) & (j < hi[..., None].long()))[:, None]  # [B, 1, Lq, Lk]
        return reference._NanPolicy.apply(o, q, k, v, reference._bad_outputs(q, k, v, vis), vis, method)


__all__ = ["attention", "decode", "unsupported_reason", "poison_outputs", "MAX_QUERIES", "SUPPORTED_DTYPES"]


def report_cases(D: int, dtype: str, causal: bool) -> list[dict]:
    """The decoding kernel as kernel-report cases (:mod:`freeatten_core.kernel_report`): LSSAR's two rounds in the
    tiles :func:`_tiles` picks on a GPU for ``dtype`` at head dim ``D``; shown, not budgeted. Per element means per
    element of the [BM, BN] tile: with G·Lq < BM folded rows, part of the tile is padding."""
    tdt = getattr(torch, dtype)
    BM, BN, warps = _tiles(16, D, tdt) if not INTERPRET else (16, 64 if dtype != "float32" else 32, 4)
    dt = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    i32, f32 = "i32", "fp32"
    sig = dict(q="*" + dt, k="*" + dt, v="*" + dt, start="*i32", end="*i32", part_z="*fp32", part_m="*fp32",
               part_s="*fp32", part_acc="*fp32", bad="*i32",
               **{s: i32 for s in ("s_qb", "s_qh", "s_qn", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn", "Hkv",
                                   "Lq", "Lk", "R", "chunk", "n_chunks", "offset_rows")},
               P=f32, LN_D=f32, TAU0=f32, TAU_C=f32, TAU_N=f32)
    half = 0 if dtype == "float32" else 1
    out = []
    # round 2 first reads every chunk's partials (a loop the compiler splits into an unrolled part and a rest)
    for rnd, loops in ((1, ["keys"]), (2, ["partials", "partials_rest", "keys"])):
        out.append(dict(name=f"decode_lssar_round{rnd}", module=__name__, kernel="lss_decode_kernel", signature=sig,
                        BM=BM, BN=BN, num_warps=warps, num_stages=2,
                        constexprs=dict(D=D, BM=BM, BN=BN, CAUSAL=causal, HAS_SPAN=False, ROUND=rnd, REWEIGHT=True,
                                        P_INT=15, HALF=half, DEG=_degree(tdt)),
                        loops=loops, D=D, dtype=dtype, causal=causal, budget_of=f"decode_lssar_round{rnd}",
                        # a contiguous [B, H_kv, Lk, D] cache (D >= 16): every stride a multiple of 16
                        multiples_of_16=["s_qb", "s_qh", "s_qn", "s_kb", "s_kh", "s_kn", "s_vb", "s_vh", "s_vn"],
                        mma_expected="HMMA"))  # 16-row tiles: mma.sync (warpgroup MMA needs 64 rows)
    return out
