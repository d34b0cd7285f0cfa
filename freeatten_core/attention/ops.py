"""LSSA / LSSAR as PyTorch custom operators, so ``torch.compile`` traces a model that uses them without graph breaks.

:func:`freeatten_core.attention` checks its inputs with Python control flow that reads tensor values (the NaN
policy's all-finite test, the values of a padding mask, packed-sequence offsets) and launches Triton kernels:
``torch.compile`` cannot trace through that, and breaks the graph around each call. Here the call is one opaque
operator, ``freeatten::lssa_attention``, with

* a fake (meta) implementation: the output is a contiguous tensor of the shape, dtype and device of ``q``;
* an autograd formula (``register_autograd``) whose backward is a second operator,
  ``freeatten::lssa_attention_backward``: it recomputes the forward under autograd through the same API call
  (the fused kernels' backward on a GPU, the reference's autograd elsewhere), so the backward costs one extra
  forward, as with activation checkpointing, and gives exactly the gradients of the eager call.

:func:`attention` is the entry point a model calls: eagerly it *is* :func:`freeatten_core.attention` (same
numbers, no extra cost); while ``torch.compile`` traces it, ``lssa``/``lssar`` go through the operator (other
methods are traced as plain PyTorch, which compiles without breaks on the reference backend).
"""

from __future__ import annotations

import torch

from . import api
from .methods import BACKENDS, FUSED_METHODS, REGISTRY, resolve

_DEFAULTS = REGISTRY["lssar"].options  # p, offset_rows

_C = torch._C
_AUTOGRAD_KEYS = (_C.DispatchKeySet(_C.DispatchKey.AutogradFunctionality) | _C.DispatchKeySet(_C.DispatchKey.AutogradOther)
                  | _C.DispatchKeySet(_C.DispatchKey.AutogradNestedTensor))


def _autograd_inside_operator():
    """The dispatcher runs an operator's implementation with autograd switched off (its keys excluded), which
    ``torch.enable_grad`` cannot undo; the backward operator recomputes the forward under autograd, so it lifts
    that exclusion for its own body (PyTorch's dispatch-key guard; the previous state is restored on exit)."""
    return _C._ForceDispatchKeyGuard(_C._dispatch_tls_local_include_set(),
                                     _C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS)


def _call(q, k, v, key_padding_mask, cu_seqlens, method, causal, backend, p, offset_rows):
    opts = dict(p=p, offset_rows=offset_rows) if method == "lssar" else {}
    return api.attention(q, k, v, method=method, causal=causal, backend=backend, key_padding_mask=key_padding_mask,
                         cu_seqlens=cu_seqlens, **opts)


@torch.library.custom_op("freeatten::lssa_attention", mutates_args=())
def lssa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                   cu_seqlens: torch.Tensor | None, method: str, causal: bool, backend: str, p: float,
                   offset_rows: int) -> torch.Tensor:
    """``freeatten_core.attention(q, k, v, method, causal, backend, key_padding_mask=..., cu_seqlens=..., p=...,
    offset_rows=...)`` as one operator (``p``, ``offset_rows`` are used by ``lssar`` only)."""
    with torch.no_grad():
        return _call(q, k, v, key_padding_mask, cu_seqlens, method, causal, backend, p, offset_rows).contiguous().clone()


@lssa_attention.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, method, causal, backend, p, offset_rows):
    return q.new_empty(q.shape)  # contiguous, like the implementation's result


@torch.library.custom_op("freeatten::lssa_attention_backward", mutates_args=())
def lssa_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_padding_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None, method: str,
                            causal: bool, backend: str, p: float,
                            offset_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`lssa_attention` for the cotangent ``grad``: the forward recomputed under autograd."""
    with _autograd_inside_operator(), torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        o = _call(q, k, v, key_padding_mask, cu_seqlens, method, causal, backend, p, offset_rows)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), grad, allow_unused=True)
    return tuple(t.new_zeros(t.shape) if g is None else g.contiguous().clone() for g, t in ((dq, q), (dk, k), (dv, v)))


@lssa_attention_backward.register_fake
def _(grad, q, k, v, key_padding_mask, cu_seqlens, method, causal, backend, p, offset_rows):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, cu, *args = inputs
    ctx.save_for_backward(q, k, v)
    ctx.batching = (kpm, cu)
    ctx.args = args


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = lssa_attention_backward(grad.contiguous(), q, k, v, *ctx.batching, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


lssa_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, method: str = "lssar", causal: bool = True, backend: str = "auto", *, key_padding_mask=None,
              cu_seqlens=None, **options):
    """:func:`freeatten_core.attention`, traceable by ``torch.compile`` without graph breaks for ``lssa``/``lssar``.

    Same arguments and result. Eagerly it calls :func:`freeatten_core.attention` directly; under
    ``torch.compile`` ``lssa``/``lssar`` run as the operator ``torch.ops.freeatten.lssa_attention`` (its backward
    recomputes the forward once). Method, options and backend are checked here, at trace time, by the registry.
    """
    if not torch.compiler.is_compiling():
        return api.attention(q, k, v, method=method, causal=causal, backend=backend,
                             key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, **options)
    m, opts = resolve(method, options)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if m.name not in FUSED_METHODS:
        return api.attention(q, k, v, method=m.name, causal=causal, backend=backend,
                             key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens, **opts)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    opts = {**_DEFAULTS, **opts}
    return lssa_attention(q, k, v, key_padding_mask, cu_seqlens, m.name, causal, backend, float(opts["p"]),
                          int(opts["offset_rows"]))


__all__ = ["attention", "lssa_attention", "lssa_attention_backward"]
