"""A drop-in multi-head attention layer: projections, optional RoPE, any method of the registry (LSSAR by default).

::

    import freeatten_core as fa
    attn = fa.AttentionLayer(embed_dim=256, num_heads=8, num_kv_heads=2, rope=10000.0)   # method="lssar"
    y = attn(x)                                   # x [B, L, 256] -> y [B, L, 256]
    y = attn(x, key_padding_mask=mask)            # mask [B, L], True = real token
    y = attn(x_packed, cu_seqlens=cu)             # x_packed [1, T, 256], sequences [cu[s], cu[s+1])
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from . import batching
from .methods import BACKENDS, resolve
from .ops import attention as attention_fn


def _positive_int(name, x):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    return int(x)


class AttentionLayer(nn.Module):
    """Multi-head (grouped-query) self-attention computed by :func:`freeatten_core.attention`.

    embed_dim, num_heads: model width E and query heads H (``E % H == 0``; head dim ``E // H``).
    num_kv_heads: key/value heads H_kv (``H % H_kv == 0``; default ``H``; 1 = multi-query attention).
    bias: biases in the four projections (q, k, v, out).
    method, backend, method_options: what :func:`freeatten_core.attention` computes (registry names and checks).
    causal: mask future positions.
    rope: ``None`` (no positions: add them elsewhere) or the RoPE base (e.g. ``10000.0``), applied to q and k
        as in the package's GPT (:class:`freeatten_core.model.Rotary`); the head dim must then be even.
    dropout: on the layer's output (after the out projection). Dropout on the attention weights is not offered:
        LSSAR's re-weighting reads each row's largest weight, which dropout would change.

    ``forward(x, key_padding_mask=None, cu_seqlens=None)``: ``x`` ``[B, L, E]`` -> ``[B, L, E]``. With
    ``key_padding_mask`` ``[B, L]`` (True = real token) padding keys are invisible, N_i counts real keys and
    padding positions output 0 (then the out projection's bias). With ``cu_seqlens`` (``x`` ``[1, T, E]``, packed
    sequences) each sequence attends within itself and its RoPE positions start at 0. Under ``torch.compile``
    LSSA/LSSAR run as one operator (:mod:`freeatten_core.attention.ops`).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, bias: bool = False,
                 method: str = "lssar", causal: bool = True, backend: str = "auto", rope: float | None = None,
                 dropout: float = 0.0, **method_options):
        super().__init__()
        E = _positive_int("embed_dim", embed_dim)
        H = _positive_int("num_heads", num_heads)
        Hkv = H if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if E % H:
            raise ValueError(f"embed_dim ({E}) must be divisible by num_heads ({H})")
        if H % Hkv:
            raise ValueError(f"num_heads ({H}) must be divisible by num_kv_heads ({Hkv})")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False, got {causal!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        m, opts = resolve(method, method_options)  # the registry's errors: unknown method, bad options
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        D = E // H
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = E, H, Hkv, D
        self.method, self.method_options, self.causal, self.backend = m.name, opts, causal, backend
        self.q_proj = nn.Linear(E, H * D, bias=bias)
        self.k_proj = nn.Linear(E, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(E, Hkv * D, bias=bias)
        self.out_proj = nn.Linear(H * D, E, bias=bias)
        self.dropout = nn.Dropout(float(dropout))
        self.rotary = None
        if rope is not None:
            from ..model import Rotary  # the package's one RoPE

            if isinstance(rope, bool) or not isinstance(rope, numbers.Real) or not rope > 1:
                raise ValueError(f"rope must be None or the RoPE base, a number > 1 (e.g. 10000.0), got {rope!r}")
            if D % 2:
                raise ValueError(f"RoPE needs an even head dim, got embed_dim / num_heads = {D}")
            self.rotary = Rotary(D, float(rope))

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.method_options.items())
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"method={self.method!r}{opts}, causal={self.causal}, backend={self.backend!r}, "
                f"rope={None if self.rotary is None else self.rotary.base}")

    def heads(self, x: torch.Tensor, cu_seqlens=None):
        """q ``[B, H, L, D]``, k, v ``[B, H_kv, L, D]`` (after RoPE): what :meth:`forward` hands to the attention."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [batch, length, embed_dim={self.embed_dim}] (batch first), got {shape}")
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            if cu_seqlens is not None:
                cu = batching.check_cu_seqlens(cu_seqlens, q, k).to(x.device)  # before its values index RoPE
                pos = torch.arange(L, device=x.device)
                start = cu[torch.bucketize(pos, cu[1:], right=True).clamp_max(cu.numel() - 2)]
                q, k = self.rotary(q, positions=pos - start), self.rotary(k, positions=pos - start)
            else:  # RoPE is relative: left padding shifts every position alike and changes nothing
                q, k = self.rotary(q), self.rotary(k)
        return q, k, v

    def forward(self, x: torch.Tensor, key_padding_mask=None, cu_seqlens=None) -> torch.Tensor:
        q, k, v = self.heads(x, cu_seqlens)
        y = attention_fn(q, k, v, method=self.method, causal=self.causal, backend=self.backend,
                         key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, **self.method_options)
        B, _, L, _ = y.shape
        return self.dropout(self.out_proj(y.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)))


__all__ = ["AttentionLayer"]
