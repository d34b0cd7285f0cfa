"""LSSA and LSSAR through PyTorch's FlexAttention (``torch.nn.attention.flex_attention``).

FlexAttention computes ``softmax(score_mod(q·k·scale))`` over the keys a ``mask_mod`` lets through. Both methods fit:

* **LSSA** is one call. Its weights f_ij/Σ_j f_ij with f = softplus(c_i·q̂_i·k̂_j), c_i = ln d·ln N_i, are
  softmax(ln f) exactly. So the inputs are the unit vectors q̂, k̂ (``scale=1``: the score *is* the cosine) and
  the score modification is s -> ln softplus(c_i·s) (:func:`lssa_score_mod`), N_i from ``q_idx`` and the
  alignment (queries aligned to the last keys, as everywhere in the package; with a key padding mask, N_i counts
  the real keys a query sees).
* **LSSAR** is two calls (:func:`lssar`):

  1. the LSSA call, also returning ln Z_i = logsumexp_j ln f_ij (``lse``) and, on CUDA, ln F_i = max_j ln f_ij
     (``max_scores``; FlexAttention has no ``max_scores`` on CPU/MPS, where :func:`row_max_cosine` computes
     max_j q̂_i·k̂_j a block of rows at a time). F_i = max_j f_ij = softplus(c_i·max_j q̂_i·k̂_j) because
     softplus is monotone, so M_i = N_i·F_i/Z_i − O_i = max_j x_ij is known before the second pass;
  2. the score modification s -> p·ln(a_i·f − b_i) with a_i = N_i/Z_i and b_i = O_i (−∞ where a_i·f − b_i ≤ 0):
     the softmax of that is ReLU(x)^p/Σ ReLU(x)^p, LSSAR's weights (:func:`lssar_score_mod`). Rows with
     M_i ≤ τ_i (no weight measurably above uniform, :func:`.reference.uniform_threshold`) keep the LSSA score,
     as in :func:`.reference.reweight`.

  Gradients flow through Z_i (the first call's ``lse`` enters a_i); M_i only selects rows and is detached, as in
  the reference. The first call's output (the LSSA output) is not needed and is discarded.
* **Masks**: :func:`mask_mod` (causal bottom-right, key padding, padding queries see nothing so they output 0)
  and :func:`block_mask` (``create_block_mask`` of it, which lets FlexAttention skip the tiles above the
  diagonal).

On a GPU, pass ``flex=torch.compile(flex_attention)`` for the fused kernel. On a CPU, PyTorch runs FlexAttention
eagerly for the forward only (it has no CPU backward); gradients there can be taken through a dense evaluation of
the same ``score_mod``/``mask_mod`` (the tests do so with PyTorch's own dense FlexAttention implementation).
What this module does not do: the fused kernels' head-dim limits do not apply (FlexAttention's own do), and
FlexAttention reaches the speed of the package's Triton kernels only for LSSA (LSSAR's two calls read Q and K
twice, like the kernels' two passes, but also compute the discarded LSSA output).
"""

from __future__ import annotations

import math

import torch

from . import api, batching, reference
from .methods import REGISTRY, resolve

try:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
except ImportError as e:  # FlexAttention with auxiliary outputs: PyTorch >= 2.9
    raise ImportError(f"freeatten_core.attention.flex needs torch.nn.attention.flex_attention with AuxRequest "
                      f"(PyTorch 2.9 or newer), found torch {torch.__version__}") from e


def _check(q, k, v, causal, key_padding_mask):
    api._check_tensors({"q": q, "k": k, "v": v}, causal)  # shapes (grouped queries too), dtypes, devices
    if key_padding_mask is None:
        return None
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"key_padding_mask needs Lq <= Lk (query row r sits at key position r + Lk - Lq), got "
                         f"Lq={q.shape[2]} > Lk={k.shape[2]}")
    return batching.check_key_padding_mask(key_padding_mask, q, k)


def row_counts(B: int, Lq: int, Lk: int, causal: bool, key_padding_mask=None, device=None) -> torch.Tensor:
    """N ``[B, Lq]`` (float32): the keys each query sees; with ``key_padding_mask`` only the real ones (at least 1,
    so that a padding query, which sees nothing, still has a finite scale)."""
    if key_padding_mask is None:
        return reference.row_counts(Lq, Lk, causal, device=device).expand(B, Lq)
    real = key_padding_mask.to(torch.float32)
    N = real.cumsum(-1)[:, Lk - Lq:] if causal else real.sum(-1, keepdim=True).expand(B, Lq)
    return N.clamp_min(1.0)


def mask_mod(Lq: int, Lk: int, causal: bool, key_padding_mask=None):
    """FlexAttention ``mask_mod``: causal with the queries aligned to the last keys, and key padding (a query at a
    padding position sees nothing, so its output is 0). ``None`` when every key is visible to every query."""
    off = Lk - Lq
    if key_padding_mask is None:
        if not causal:
            return None

        def causal_mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + off

        return causal_mask
    kpm = key_padding_mask

    def padded_mask(b, h, q_idx, kv_idx):
        seen = kpm[b, kv_idx] & kpm[b, q_idx + off]
        return seen & (kv_idx <= q_idx + off) if causal else seen

    return padded_mask


def block_mask(B: int, Lq: int, Lk: int, causal: bool, key_padding_mask=None, device=None):
    """The ``BlockMask`` of :func:`mask_mod` (``None`` when nothing is masked)."""
    mm = mask_mod(Lq, Lk, causal, key_padding_mask)
    if mm is None:
        return None
    return create_block_mask(mm, B if key_padding_mask is not None else None, None, Lq, Lk, device=device)


def lssa_score_mod(c: torch.Tensor):
    """s -> ln softplus(c_i·s), for scores s = q̂·k̂ (``scale=1``); ``c`` ``[B, Lq]`` = ln d·ln N_i."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return reference.log_softplus(c[b, q_idx] * score)

    return score_mod


def lssar_score_mod(c: torch.Tensor, log_a: torch.Tensor, b_off: torch.Tensor, ok: torch.Tensor, p: float):
    """s -> p·ln(a_i·f − b_i) (−∞ where that is <= 0), f = softplus(c_i·s), on the rows where ``ok``; the LSSA
    score ln f elsewhere. ``c``, ``b_off`` ``[B, Lq]``; ``log_a`` = ln(N_i/Z_i) and ``ok`` ``[B, H, Lq]``."""

    def score_mod(score, b, h, q_idx, kv_idx):
        lf = reference.log_softplus(c[b, q_idx] * score)
        x = torch.exp(lf + log_a[b, h, q_idx]) - b_off[b, q_idx]
        pos = x > 0
        r = torch.where(pos, p * torch.log(torch.where(pos, x, torch.ones_like(x))), torch.full_like(x, -math.inf))
        return torch.where(ok[b, h, q_idx], r, lf)

    return score_mod


def row_max_cosine(qh: torch.Tensor, kh: torch.Tensor, causal: bool, key_padding_mask=None,
                   rows: int = 256) -> torch.Tensor:
    """max_j q̂_i·k̂_j over the keys query i sees, ``[B, H, Lq]`` (−∞ for a query that sees none), computed a
    block of ``rows`` query rows at a time (memory ``rows × Lk`` per head, never ``Lq × Lk``). Used where
    FlexAttention cannot return ``max_scores`` (CPU, MPS). Detached: it only selects rows."""
    B, H, Lq, _ = qh.shape
    Lk = kh.shape[2]
    g = H // kh.shape[1]
    kh = kh.detach().repeat_interleave(g, 1) if g > 1 else kh.detach()
    out = []
    for r0 in range(0, Lq, rows):
        s = qh[:, :, r0:r0 + rows].detach() @ kh.transpose(-1, -2)  # [B, H, rows, Lk]
        i = torch.arange(r0, min(r0 + rows, Lq), device=qh.device)[:, None] + (Lk - Lq)
        j = torch.arange(Lk, device=qh.device)[None, :]
        vis = (j <= i) if causal else torch.ones_like(j <= i)
        vis = vis[None, None]
        if key_padding_mask is not None:
            vis = vis & key_padding_mask[:, None, None, :] & key_padding_mask[:, None, i[:, 0], None]
        out.append(s.masked_fill(~vis, -math.inf).amax(-1))
    return torch.cat(out, dim=-1)


def _prepare(q, k, causal, key_padding_mask):
    B, _, Lq, D = q.shape
    Lk = k.shape[2]
    ct = reference.compute_dtype(q.dtype)
    N = row_counts(B, Lq, Lk, causal, key_padding_mask, device=q.device).to(ct)
    c = reference.length_scale(N, D)
    qh, kh = reference.unit(q.to(ct)), reference.unit(k.to(ct))
    return N, c, qh, kh, block_mask(B, Lq, Lk, causal, key_padding_mask, device=q.device)


def lssa(q, k, v, causal: bool = True, *, key_padding_mask=None, flex=flex_attention):
    """LSSA with one FlexAttention call; same arguments and result as ``freeatten_core.attention(..., "lssa")``.

    ``k``/``v`` may have fewer heads (grouped queries). ``flex``: the FlexAttention function (e.g.
    ``torch.compile(flex_attention)`` on a GPU).
    """
    kpm = _check(q, k, v, causal, key_padding_mask)
    _, c, qh, kh, bm = _prepare(q, k, causal, kpm)
    out = flex(qh, kh, v.to(qh.dtype), score_mod=lssa_score_mod(c), block_mask=bm, scale=1.0,
               enable_gqa=q.shape[1] != k.shape[1])
    return out.to(q.dtype)


def lssar(q, k, v, causal: bool = True, *, key_padding_mask=None, flex=flex_attention, **options):
    """LSSAR with two FlexAttention calls (module docstring); same arguments and result as
    ``freeatten_core.attention(..., "lssar", p=..., offset_rows=...)``; options checked by the registry."""
    _, opts = resolve("lssar", options)
    opts = {**REGISTRY["lssar"].options, **opts}
    p, offset_rows = float(opts["p"]), int(opts["offset_rows"])
    kpm = _check(q, k, v, causal, key_padding_mask)
    N, c, qh, kh, bm = _prepare(q, k, causal, kpm)
    gqa = q.shape[1] != k.shape[1]
    vv = v.to(qh.dtype)
    fused_max = q.is_cuda  # FlexAttention returns max_scores on CUDA only
    _, aux = flex(qh, kh, vv, score_mod=lssa_score_mod(c), block_mask=bm, scale=1.0, enable_gqa=gqa,
                  return_aux=AuxRequest(lse=True, max_scores=fused_max))
    lse = aux.lse  # ln Z_i [B, H, Lq]
    if fused_max:
        mx = aux.max_scores  # ln F_i
    else:  # ln F_i = ln softplus(c_i · max_j q̂_i·k̂_j): softplus is monotone
        mx = reference.log_softplus(c[:, None, :] * row_max_cosine(qh, kh, causal, kpm))
    seen = torch.isfinite(lse)  # rows with at least one visible key
    Nh = N[:, None, :]
    log_a = torch.where(seen, torch.log(Nh) - lse, torch.zeros_like(lse))
    b_off = (N > offset_rows).to(N.dtype)
    M = (Nh * torch.exp(torch.where(seen, mx - lse, torch.zeros_like(lse))).detach() - b_off[:, None, :])
    tau = reference.uniform_threshold(c, N, q.shape[-1], qh.dtype)[:, None, :]
    ok = seen & (M > tau)
    out = flex(qh, kh, vv, score_mod=lssar_score_mod(c, log_a, b_off, ok, p), block_mask=bm, scale=1.0,
               enable_gqa=gqa)
    return out.to(q.dtype)


__all__ = ["lssa", "lssar", "lssa_score_mod", "lssar_score_mod", "mask_mod", "block_mask", "row_counts", "row_max_cosine"]
