"""The public entry point: input checks, then dispatch by method and backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import batching, reference
from .methods import BACKENDS, FUSED_METHODS, METHODS, resolve

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

DECODE_MAX_QUERIES = 16
"""Calls with at most this many query rows and no gradient go to the decoding kernel (:mod:`.decode_kernels`)."""


def _check_tensors(named: dict, causal) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, heads, length, head_dim], "
                             f"got {t.ndim} (shape {tuple(t.shape)})")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes: float16, bfloat16, float32, float64")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    tensors = list(named.items())
    (n0, t0) = tensors[0]
    for name, t in tensors[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n0} and {name} must share a dtype, got {t0.dtype} and {t.dtype}")
        if t.device != t0.device:
            raise ValueError(f"{n0} and {name} are on different devices ({t0.device} and {t.device})")
    q, k = named["q"], named["k"]
    B, H, Lq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"q and k must have the same batch size, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if "v" in named and named["v"].shape[1] != k.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {tuple(k.shape)} and "
                         f"v {tuple(named['v'].shape)}")
    if k.shape[1] < 1 or H % k.shape[1] != 0:
        raise ValueError(f"the query heads must be a multiple of the key/value heads (grouped-query attention: "
                         f"H % H_kv == 0), got H = {H} (q {tuple(q.shape)}) and H_kv = {k.shape[1]} "
                         f"(k {tuple(k.shape)})")
    if k.shape[3] != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {k.shape[3]}")
    if "v" in named:
        v = named["v"]
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k [batch, heads, Lk, head_dim] = {tuple(k.shape)}, "
                             f"got {tuple(v.shape)}")
    Lk = k.shape[2]
    if Lq < 1 or Lk < 1 or D < 1:
        raise ValueError(f"lengths and head dim must be >= 1, got Lq={Lq}, Lk={Lk}, head_dim={D}")
    if causal and Lq > Lk:
        raise ValueError(f"causal attention needs Lq <= Lk (queries are aligned to the last Lq keys), "
                         f"got Lq={Lq} > Lk={Lk}")


def _check_batching(q, k, key_padding_mask, cu_seqlens):
    """(mask [B, Lk] bool or None, cu_seqlens int64 or None, the reference's visibility [B, 1, Lq, Lk] or None)."""
    if key_padding_mask is not None and cu_seqlens is not None:
        raise ValueError("give key_padding_mask or cu_seqlens, not both: packed sequences (cu_seqlens) have no "
                         "padding")
    Lq = q.shape[2]
    if key_padding_mask is not None:
        mask = batching.check_key_padding_mask(key_padding_mask, q, k)
        if Lq > k.shape[2]:
            raise ValueError(f"key_padding_mask needs Lq <= Lk (query row r sits at key position r + Lk - Lq), got "
                             f"Lq={Lq} > Lk={k.shape[2]}")
        return mask, None, batching.padding_visibility(mask, Lq)
    if cu_seqlens is not None:
        cu = batching.check_cu_seqlens(cu_seqlens, q, k)
        return None, cu, batching.packed_visibility(cu, Lq)
    return None, None, None


def _triton_backend():
    """The fused-kernel module, or None with the reason it cannot be used."""
    try:
        from . import triton_kernels  # noqa: F401  (imports triton)
    except ImportError as e:  # triton not installed, or the kernels are not built in this version
        return None, f"the Triton kernels are unavailable ({e})"
    return triton_kernels, None


def _decode_backend():
    """The decoding-kernel module, or None with the reason it cannot be used."""
    try:
        from . import decode_kernels  # noqa: F401  (imports triton)
    except ImportError as e:
        return None, f"the Triton decoding kernel is unavailable ({e})"
    return decode_kernels, None


def sdpa_softmax(q, k, v, causal: bool, visible: torch.Tensor | None = None):
    """Softmax attention through PyTorch's fused ``scaled_dot_product_attention``, bottom-right causal.

    What ``backend="auto"`` uses for ``softmax`` on CUDA, so a softmax baseline never materialises ``[Lq, Lk]``
    (unless a padding mask or packed sequences make it a mask of that size). ``k``, ``v`` may have fewer heads
    (grouped queries, SDPA's ``enable_gqa``); ``visible`` (bool ``[B, 1, Lq, Lk]``) restricts the keys beyond the
    causal rule, and a row that sees no key outputs 0, as in the reference.
    """
    kw = dict(enable_gqa=True) if q.shape[1] != k.shape[1] else {}
    Lq, Lk = q.shape[-2], k.shape[-2]
    if visible is None:
        if not causal or Lq == 1:  # one query at the last position sees every key
            return F.scaled_dot_product_attention(q, k, v, **kw)
        if Lq == Lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        # SDPA's is_causal aligns top-left; the package aligns the queries to the last keys (every row sees some)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=reference.visible_mask(Lq, Lk, True, q.device),
                                              **kw)
    vis = reference.visibility(Lq, Lk, causal, visible, device=q.device)
    empty = ~vis.any(dim=-1, keepdim=True)  # rows that see no key: any finite stand-in, then 0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=vis | empty, **kw)
    return o.masked_fill(empty, 0.0) if bool(empty.any()) else o


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _fused(q, k, v, name, causal, explicit, mask, cu, opts):
    """(output, None) from the fused kernels, or (None, the reason they cannot run this call)."""
    if name not in FUSED_METHODS:
        return None, f"method {name!r} has no fused kernel (those do: {', '.join(FUSED_METHODS)})"
    kernels, why = _triton_backend()
    if kernels is None:
        return None, why
    why = kernels.unsupported_reason(q, k, v, explicit=explicit)
    if why is not None:
        return None, why
    if mask is not None:
        why = batching.non_contiguous_reason(mask)
        if why is not None:
            return None, why
    Lq = q.shape[2]
    if Lq <= DECODE_MAX_QUERIES and cu is None and not _needs_grad(q, k, v):
        dec, _ = _decode_backend()
        if dec is not None and dec.unsupported_reason(q, k, v) is None:
            start = end = None
            if mask is not None:
                start, end, _ = batching.padding_spans(mask)
            return dec.attention(q, k, v, name, causal, start=start, end=end, **opts), None
    if getattr(kernels, "SUPPORTS_SEQS", False):  # the kernels take sequence descriptors and grouped queries
        seqs = None
        if mask is not None:
            seqs = batching.padding_seqs(mask, Lq)
        elif cu is not None:
            seqs = batching.packed_seqs(cu, q.device)
        if seqs is not None and seqs.shape[0] == 0:  # no query row sees a real token: every output is 0
            vis = batching.padding_visibility(mask, Lq)
            return reference.attention(q, k, v, name, causal, vis, **opts), None
        return kernels.attention(q, k, v, method=name, causal=causal, seqs=seqs, **opts), None
    if mask is not None or cu is not None:
        return None, ("padding masks and packed sequences need the fused kernels' sequence descriptors "
                      "(triton_kernels.SUPPORTS_SEQS), which this version of the kernels does not have")
    if k.shape[1] != q.shape[1]:  # grouped queries, kernels without native support: K/V repeated per query head
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return kernels.attention(q, k, v, method=name, causal=causal, **opts), None


def attention(q, k, v, method: str = "lssar", causal: bool = True, backend: str = "auto", *,
              key_padding_mask=None, cu_seqlens=None, **options):
    """Attention output ``[B, H, Lq, D]`` for ``q`` ``[B, H, Lq, D]``, ``k``, ``v`` ``[B, H_kv, Lk, D]``.

    method: one of :data:`freeatten_core.METHODS` (see ``freeatten_core.method_table()``).
    causal: mask future keys; with ``Lq < Lk`` queries align to the last ``Lq`` keys (query row ``r`` sits at key
        position ``r + Lk - Lq``), and ``N_i`` counts the keys query ``i`` sees.
    backend: ``"reference"`` (plain PyTorch, any device, materialises ``[Lq, Lk]``), ``"triton"`` (fused
        kernels for ``lssa``/``lssar``), ``"auto"`` (fused where it can run, reference otherwise: on CUDA the
        Triton kernels for ``lssa``/``lssar`` and PyTorch SDPA for ``softmax``). Calls with at most
        ``DECODE_MAX_QUERIES = 16`` query rows that need no gradient (decoding against a KV cache) run the
        split-key decoding kernel.
    key_padding_mask: optional ``[B, Lk]``, bool or 0/1 integers (Hugging Face's ``attention_mask``), True/1 = a
        real token. A real query sees the real keys that causality allows and ``N_i`` counts only those; a query
        at a padding position outputs 0 and gets zero gradients. Needs ``Lq <= Lk``.
    cu_seqlens: optional packed variable-length batch (FlashAttention's form): ``q`` ``[1, H, T, D]``, ``k``/``v``
        ``[1, H_kv, T, D]`` and an integer tensor ``[S + 1]`` = ``0, ..., T``, strictly increasing; sequence ``s``
        is rows ``[cu[s], cu[s+1])`` and attends only within itself (causal within itself), ``N_i`` counting only
        its keys. Not together with ``key_padding_mask``.
    options: method options, e.g. ``p=15.0, offset_rows=3`` for ``lssar``; ``s=1.0`` for ``ssmax``.

    Grouped-query / multi-query attention: ``H % H_kv == 0``, query head ``h`` uses key head ``h // (H // H_kv)``;
    the result equals the call with K and V repeated per query head, without the copy.
    """
    _check_tensors({"q": q, "k": k, "v": v}, causal)
    m, opts = resolve(method, options)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    mask, cu, visible = _check_batching(q, k, key_padding_mask, cu_seqlens)
    if backend == "auto" and m.name == "softmax" and q.is_cuda:
        return sdpa_softmax(q, k, v, causal, visible)
    if backend in ("triton", "auto"):
        out, why = _fused(q, k, v, m.name, causal, backend == "triton", mask, cu, opts)
        if out is not None:
            return out
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this call: {why}")
    return reference.attention(q, k, v, m.name, causal, visible, **opts)


def attention_weights(q, k, method: str = "lssar", causal: bool = True, *, key_padding_mask=None, cu_seqlens=None,
                      **options):
    """The attention weights ``[B, H, Lq, Lk]`` (always the reference: it materialises the matrix).

    ``k`` may have ``H_kv`` heads (grouped queries), and ``key_padding_mask`` / ``cu_seqlens`` mean what they mean
    for :func:`attention`; rows of padding queries are 0. Returned in the input dtype. For half-precision inputs
    they are computed in float32 first.
    """
    _check_tensors({"q": q, "k": k}, causal)
    m, opts = resolve(method, options)
    _, _, visible = _check_batching(q, k, key_padding_mask, cu_seqlens)
    return reference.attention_weights(q, k, m.name, causal, visible, **opts).to(q.dtype)


__all__ = ["attention", "attention_weights", "METHODS", "DECODE_MAX_QUERIES"]
