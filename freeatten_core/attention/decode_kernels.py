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
rows), so one program reads each K/V tile once for the whole group. Padding: per batch element the real keys are
``[start_b, end_b)`` (left or right padding); a query row at key position ``r + Lk − Lq`` sees the keys
``start_b <= j < end_b`` (and ``j <= r + Lk − Lq`` when causal), a query at a padding position outputs 0. Chunks
outside ``[start_b, end_b)`` are skipped. The cache is read through its strides (a slice of a preallocated cache is
not copied); the key normalisation ``k̂ = k/‖k‖`` happens on the tile in registers, after division by the
largest ``|k_jd|`` (as :func:`.reference.unit`, so that ``‖k‖²`` cannot overflow).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether triton runs kernels in its interpreter (read once, at import, as triton itself does)."""

MAX_QUERIES = 16
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
MAX_INT_P = 64

# --------------------------------------------------------------------------------------------------------
# A test hook: every buffer the kernels write is allocated filled with NaN, so a position left unwritten shows.
# --------------------------------------------------------------------------------------------------------
_POISON = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within this context every buffer the decoding kernels write is allocated filled with NaN."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def _new(shape, dtype, device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------------
# Device code
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _softplus2(t):
    # f = log2(1 + 2^t) = max(t, 0) + log2(1 + 2^-|t|); t = −inf (an invisible key) gives 0
    return tl.maximum(t, 0.0) + tl.math.log2(1.0 + tl.math.exp2(-tl.abs(t)))


@triton.jit
def _pow(y, P, P_INT: tl.constexpr):
    # y**P for y >= 0: square-and-multiply for an integer P_INT >= 1, exp2(P·log2 y) otherwise (0 where y = 0)
    if P_INT >= 1:
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
def _scores(b_q, k_ptr, s_kn, o_j, j_end, b_lo, b_hi, D: tl.constexpr, HALF: tl.constexpr):
    # [BM, BN] t_ij = q̃_i·k̂_j for keys o_j (q̃ = c·log2(e)·q̂ from the host), −inf where row i does not see key j
    o_d = tl.arange(0, D)
    b_k = tl.load(k_ptr + o_j[:, None] * s_kn + o_d[None, :], mask=(o_j < j_end)[:, None], other=0.0).to(tl.float32)
    m = tl.max(tl.abs(b_k), 1)  # [BN]: divide by the largest |entry| first, so ‖k‖² cannot overflow
    b_k = b_k * (1.0 / tl.where(m > 0, m, 1.0))[:, None]
    nrm = tl.sqrt(tl.sum(b_k * b_k, 1))
    b_k = b_k * tl.where(nrm > 0, 1.0 / tl.where(nrm > 0, nrm, 1.0), 0.0)[:, None]  # k̂ (a zero key: 0)
    if HALF:
        b_t = tl.dot(b_q.to(tl.float16), tl.trans(b_k.to(tl.float16)))
    else:
        b_t = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    vis = (o_j[None, :] >= b_lo[:, None]) & (o_j[None, :] < b_hi[:, None]) & (o_j < j_end)[None, :]
    return tl.where(vis, b_t, float("-inf"))


@triton.jit
def _values(v_ptr, s_vn, o_j, j_end, D: tl.constexpr):
    o_d = tl.arange(0, D)
    return tl.load(v_ptr + o_j[:, None] * s_vn + o_d[None, :], mask=(o_j < j_end)[:, None], other=0.0)


@triton.jit
def _pv(b_w, b_v, HALF: tl.constexpr):
    # Σ_j w_ij v_j: half-precision values stay in their dtype on the tensor cores (w cast to it), float32 exact
    if HALF:
        r = tl.dot(b_w.to(b_v.dtype), b_v)
    else:
        r = tl.dot(b_w, b_v.to(tl.float32), input_precision="ieee")
    return r


@triton.jit
def lss_decode_kernel(
    q, k, v, row_lo, row_hi, row_a, row_b, part_s, part_m, part_acc,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    Hkv, Lq, R, chunk, P,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ROUND: tl.constexpr, REWEIGHT: tl.constexpr,
    P_INT: tl.constexpr, HALF: tl.constexpr,
):
    # One program: BM folded query rows of one (batch, key head) against the keys of one chunk.
    # q [B·Hkv, R, D] (q̃ rows, R = G·Lq: row m is query row m % Lq of the group's head m // Lq), k/v through their
    # strides, row_lo/row_hi [B, Lq] the keys [lo, hi) each query row sees, row_a/row_b [B·Hkv, R] (round 2: the
    # re-weighting constants, a = 0 marks a row that keeps u = f). Writes per (chunk, row): part_s the sum
    # (Σ f or Σ u), part_m the largest t (round 1 of LSSAR), part_acc [.., D] Σ w·v (LSSA, and round 2).
    i_c = tl.program_id(0)
    i_m = tl.program_id(1)
    i_bh = tl.program_id(2)
    n_bh = tl.num_programs(2)
    i_b = i_bh // Hkv
    i_h = i_bh % Hkv
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    o_d = tl.arange(0, D)
    m_m = o_m < R
    r = o_m % Lq
    b_lo = tl.load(row_lo + i_b * Lq + r, mask=m_m, other=0)
    b_hi = tl.load(row_hi + i_b * Lq + r, mask=m_m, other=0)
    p_q = (i_bh.to(tl.int64) * R + o_m[:, None]) * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_m[:, None], other=0.0).to(tl.float32)  # [BM, D]
    k_ptr = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    v_ptr = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    # the chunk's keys, narrowed to those some row of the block sees (skips padding and the causal tail)
    j_lo = tl.maximum(i_c * chunk, tl.min(tl.where(m_m, b_lo, 2147483647), 0))
    j_end = tl.minimum(i_c * chunk + chunk, tl.max(tl.where(m_m, b_hi, 0), 0))
    if ROUND == 2:
        b_a = tl.load(row_a + i_bh * R + o_m, mask=m_m, other=0.0)
        b_b = tl.load(row_b + i_bh * R + o_m, mask=m_m, other=0.0)
    b_s = tl.zeros([BM], dtype=tl.float32)
    b_mx = tl.full([BM], float("-inf"), tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for j0 in range(j_lo, j_end, BN):
        o_j = j0 + tl.arange(0, BN)
        b_t = _scores(b_q, k_ptr, s_kn, o_j, j_end, b_lo, b_hi, D, HALF)  # [BM, BN]
        b_f = _softplus2(b_t)
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
    p_s = (i_c * n_bh + i_bh).to(tl.int64) * R + o_m
    tl.store(part_s + p_s, b_s, mask=m_m)
    if REWEIGHT and ROUND == 1:
        tl.store(part_m + p_s, b_mx, mask=m_m)
    else:
        tl.store(part_acc + p_s[:, None] * D + o_d[None, :], b_acc, mask=m_m[:, None])


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
           chunk: int | None = None) -> torch.Tensor:
    """The kernel call on finite inputs: o ``[B, H, Lq, D]`` in q's dtype. ``start``/``end``: ``[B]`` real keys per
    batch element (None: all); ``chunk``: keys per program (None: chosen for the device)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G, R = H // Hkv, (H // Hkv) * Lq
    dev = q.device
    lo, hi, N = _row_ranges(B, Lq, Lk, causal, start, end, dev)  # N [B, Lq]
    empty = N == 0
    Ns = torch.where(empty, torch.ones_like(N), N)
    c = torch.where(empty, torch.zeros_like(N), reference.length_scale(Ns, D))  # c_i = ln d · ln N_i
    half = q.dtype != torch.float32 and not INTERPRET
    qs = reference.unit(q.float()) * (c * LOG2E).to(torch.float32)[:, None, :, None]  # q̃ = c·log2(e)·q̂
    qs = reference._fold(qs, Hkv).contiguous()  # [B, Hkv, R, D]
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    BM = min(64, max(16, triton.next_power_of_2(R)))
    BN = 16 if INTERPRET else 64
    n_m = triton.cdiv(R, BM)
    ck = _chunking(Lk, n_m * B * Hkv, dev, chunk, BN)
    n_c = triton.cdiv(Lk, ck)
    grid = (n_c, n_m, B * Hkv)
    f32 = torch.float32
    part_s = _new((n_c, B * Hkv, R), f32, dev)
    part_acc = _new((n_c, B * Hkv, R, D), f32, dev)
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2))
    p_int = int(p) if float(p).is_integer() and 1 <= p <= MAX_INT_P else -1
    meta = dict(D=D, BM=BM, BN=BN, REWEIGHT=reweight, P_INT=p_int, HALF=half)
    if reweight:
        part_m = _new((n_c, B * Hkv, R), f32, dev)
        dummy = torch.zeros(1, dtype=f32, device=dev)
        lss_decode_kernel[grid](qs, k, v, lo, hi, dummy, dummy, part_s, part_m, part_acc, *strides,
                                Hkv, Lq, R, ck, float(p), ROUND=1, **meta)
        # the row constants, as the forward kernel forms them: M = N·F/Z − O; y = x/M = a·f − b
        Z = part_s.sum(0)  # [B·Hkv, R]
        F = torch.logaddexp2(part_m.amax(0), torch.zeros_like(Z))  # f(max t): softplus is monotone
        Nr = reference._fold(Ns.to(f32)[:, None, :, None].expand(B, H, Lq, 1), Hkv).reshape(B * Hkv, R)
        tau = reference.uniform_threshold(reference._fold(c.to(f32)[:, None, :, None].expand(B, H, Lq, 1), Hkv)
                                          .reshape(B * Hkv, R), Nr, D, f32)
        O = (Nr > offset_rows).to(f32)
        den = Nr * F - O * Z
        ok = den > tau * Z
        rden = 1.0 / torch.where(ok, den, torch.ones_like(den))
        a = torch.where(ok, Nr * rden, torch.zeros_like(den)).contiguous()
        b = torch.where(ok, O * Z * rden, torch.zeros_like(den)).contiguous()
        part_s = _new((n_c, B * Hkv, R), f32, dev)
        lss_decode_kernel[grid](qs, k, v, lo, hi, a, b, part_s, part_m, part_acc, *strides,
                                Hkv, Lq, R, ck, float(p), ROUND=2, **meta)
    else:
        lss_decode_kernel[grid](qs, k, v, lo, hi, part_s, part_s, part_s, part_s, part_acc, *strides,
                                Hkv, Lq, R, ck, float(p), ROUND=1, **meta)
    S = part_s.sum(0)[..., None]  # [B·Hkv, R, 1]
    o = part_acc.sum(0) / torch.where(S > 0, S, torch.ones_like(S))
    o = reference._unfold(o.reshape(B, Hkv, R, D), H)
    return o.masked_fill(empty[:, None, :, None], 0.0).to(q.dtype)


def attention(q, k, v, method: str, causal: bool, start=None, end=None, p: float = 15.0, offset_rows: int = 3,
              chunk: int | None = None) -> torch.Tensor:
    """LSSA or LSSAR for decoding, forward only: ``q`` ``[B, H, Lq <= 16, D]``, ``k``/``v`` ``[B, H_kv, Lk, D]``.

    ``start``/``end`` (``[B]`` integers, both or neither): the real keys of each batch element are
    ``[start_b, end_b)``; queries at padding positions output 0. Non-finite inputs follow the package's NaN policy
    (the kernel runs on the finite part, the reference's policy marks the outputs that depend on a non-finite
    element). No gradient flows through this function: the API calls it only when none is needed.
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
        if reference._all_finite(q, k, v):
            return decode(q, k, v, *args)
        fq, fk, fv = (reference._finite(t) for t in (q, k, v))
        o = decode(fq, fk, fv, *args)
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
        lo, hi, _ = _row_ranges(B, Lq, Lk, causal, start, end, q.device)
        j = torch.arange(Lk, device=q.device)
        vis = ((j >= lo[..., None].long()) & (j < hi[..., None].long()))[:, None]  # [B, 1, Lq, Lk]
        return reference._NanPolicy.apply(o, q, k, v, reference._bad_outputs(q, k, v, vis), vis, method)


__all__ = ["attention", "decode", "unsupported_reason", "poison_outputs", "MAX_QUERIES", "SUPPORTED_DTYPES"]
