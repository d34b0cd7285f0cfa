"""The public entry point: input checks, then dispatch by method and backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .methods import BACKENDS, FUSED_METHODS, METHODS, resolve

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    if k.shape[0] != B or k.shape[1] != H:
        raise ValueError(f"q and k must have the same batch and heads, got q {tuple(q.shape)} and k {tuple(k.shape)}")
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


def _triton_backend():
    """The fused-kernel module, or None with the reason it cannot be used."""
    try:
        from . import triton_kernels  # noqa: F401  (imports triton)
    except ImportError as e:  # triton not installed, or the kernels are not built in this version
        return None, f"the Triton kernels are unavailable ({e})"
    return triton_kernels, None


def sdpa_softmax(q, k, v, causal: bool):
    """Softmax attention through PyTorch's fused ``scaled_dot_product_attention``, bottom-right causal.

    What ``backend="auto"`` uses for ``softmax`` on CUDA, so a softmax baseline never materialises ``[Lq, Lk]``.
    """
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # SDPA's is_causal aligns top-left; the package aligns the queries to the last keys
    return F.scaled_dot_product_attention(q, k, v, attn_mask=reference.visible_mask(q.shape[-2], k.shape[-2], True,
                                                                                       q.device))


def attention(q, k, v, method: str = "lssar", causal: bool = True, backend: str = "auto", **options):
    """Attention output ``[B, H, Lq, D]`` for ``q`` ``[B, H, Lq, D]``, ``k``, ``v`` ``[B, H, Lk, D]``.

    method: one of :data:`freeatten_core.METHODS` (see ``freeatten_core.method_table()``).
    causal: mask future keys; with ``Lq < Lk`` queries align to the last ``Lq`` keys, and ``N_i`` counts the
        keys query ``i`` sees.
    backend: ``"reference"`` (plain PyTorch, any device, materialises ``[Lq, Lk]``), ``"triton"`` (fused
        kernels for ``lssa``/``lssar``), ``"auto"`` (fused where it can run, reference otherwise: on CUDA the
        Triton kernels for ``lssa``/``lssar`` and PyTorch SDPA for ``softmax``).
    options: method options, e.g. ``p=15.0, offset_rows=3`` for ``lssar``; ``s=1.0`` for ``ssmax``.
    """
    _check_tensors({"q": q, "k": k, "v": v}, causal)
    m, opts = resolve(method, options)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto" and m.name == "softmax" and q.is_cuda:
        return sdpa_softmax(q, k, v, causal)
    if backend in ("triton", "auto"):
        kernels, why = _triton_backend() if m.name in FUSED_METHODS else (None, f"method {m.name!r} has no "
                                                                         f"fused kernel (those do: "
                                                                         f"{', '.join(FUSED_METHODS)})")
        if kernels is not None:
            why = kernels.unsupported_reason(q, k, v, explicit=backend == "triton")
            if why is None:
                return kernels.attention(q, k, v, method=m.name, causal=causal, **opts)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this call: {why}")
    return reference.attention(q, k, v, m.name, causal, **opts)


def attention_weights(q, k, method: str = "lssar", causal: bool = True, **options):
    """The attention weights ``[B, H, Lq, Lk]`` (always the reference: it materialises the matrix).

    Returned in the input dtype. For half-precision inputs they are computed in float32 first.
    """
    _check_tensors({"q": q, "k": k}, causal)
    m, opts = resolve(method, options)
    return reference.attention_weights(q, k, m.name, causal, **opts).to(q.dtype)


__all__ = ["attention", "attention_weights", "METHODS"]
