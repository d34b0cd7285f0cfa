"""LSSA / LSSAR as an attention implementation of Hugging Face ``transformers`` (version 5).

::

    from freeatten_core.integrations.transformers import register
    register()                                   # registers "lssa" and "lssar" (options: register(p=20.0))
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="lssar")
    model.set_attn_implementation("lssar")       # or switch a loaded model

Every decoder that calls ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, GPT-NeoX, Mistral, ...) then computes its
attention with :func:`freeatten_core.attention`. What the adapter does with what the model passes:

* **layout**: query ``[B, H, Lq, D]``, key/value ``[B, H_kv, Lk, D]``; with fewer key/value heads (grouped-query
  attention) they go to the package as they are (no copy per query head). The output is returned as
  ``[B, Lq, H, D]`` with weights ``None``.
* **scaling** is ignored by the methods that normalise q and k to unit vectors (LSSA, LSSAR and the σ
  re-weighting ablation: their scale is ln(d)·ln(N_i), not 1/√d). A method that uses q·k/√d (``softmax``, the
  baselines) accepts only the model's default ``scaling = 1/√d`` and raises on any other value.
* **dropout** on the attention weights is not supported: a model that trains with ``attention_dropout > 0``
  raises (set ``config.attention_dropout = 0.0``). Dropout would also break LSSAR's re-weighting, which reads the
  whole row.
* **masks**: the adapter registers a mask builder with ``AttentionMaskInterface`` under the same name, so the
  model hands over its causal + padding mask (boolean ``[B, 1, Lq, Lk]``, or ``None`` for a plain causal
  mask). The adapter turns it into the package's semantics: causal with the queries aligned to the last ``Lq``
  keys (a KV cache gives ``Lq < Lk``) and ``key_padding_mask`` ``[B, Lk]`` (True = real token). N_i, the
  length in LSSA's scale, counts the real keys a query sees, so a left-padded prompt gives the logits of the
  prompt alone. A query at a padding position outputs 0 (HF's own implementations give it some average: the
  model's loss ignores those positions either way). Trailing key slots that no query sees (a static cache's
  unused tail) are dropped. Packed sequences (batch 1, ``position_ids`` restarting at 0, no cache: what
  ``DataCollatorWithFlattening`` produces) become the package's ``cu_seqlens``, each sequence with its own N_i.
  Any other mask (sliding window, chunked, bidirectional blocks, a float mask with biases) cannot be expressed
  and raises a ``ValueError``.
* ``softcap``, ``sliding_window``, attention sinks (``s_aux``) and ``position_bias`` raise a ``ValueError``.
* **torch.compile**: while a model is traced, ``lssa``/``lssar`` run as one operator,
  ``torch.ops.freeatten.hf_attention`` (mask decoding and attention inside; its backward recomputes the forward,
  as :mod:`freeatten_core.attention.ops` does), so the attention adds no graph break.
"""

from __future__ import annotations

import math

try:
    import transformers as _hf
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:
    raise ImportError("freeatten_core.integrations.transformers needs Hugging Face transformers >= 5; install the "
                      "extra: pip install 'freeatten-core[hf]'") from e

import torch

from ..attention import ops, reference
from ..attention.methods import BACKENDS, FUSED_METHODS, METHODS, REGISTRY, resolve

_MAJOR = int(_hf.__version__.split(".")[0])
if _MAJOR < 5:
    raise ImportError(f"freeatten_core.integrations.transformers needs transformers >= 5 (its attention and mask "
                      f"interfaces), found {_hf.__version__}; install the extra: pip install 'freeatten-core[hf]'")

UNIT_SPHERE_METHODS = tuple(m for m in METHODS if "q̂" in REGISTRY[m].formula)
"""The methods whose scores use unit vectors q̂, k̂ (no 1/√d): they ignore the model's ``scaling``."""

_UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias")


def _visible(mask: torch.Tensor, Lk: int) -> torch.Tensor:
    """A boolean ``[B|1, 1, Lq, Lk]`` visibility from HF's mask (boolean, or additive float with 0 and -inf/min)."""
    if mask.dtype == torch.bool:
        vis = mask
    elif mask.is_floating_point():
        lo = torch.finfo(mask.dtype).min
        blocked = mask <= lo / 2
        if not bool(((mask == 0) | blocked).all()):
            raise ValueError("the attention mask holds additive biases (float values other than 0 and -inf); LSSA/"
                             "LSSAR take only which keys are visible, not biases")
        vis = ~blocked
    else:
        raise TypeError(f"attention mask must be boolean or floating point, got dtype {mask.dtype}")
    if vis.ndim != 4:
        raise ValueError(f"attention mask must have 4 dimensions [batch, heads, Lq, Lk], got shape "
                         f"{tuple(vis.shape)}")
    if vis.shape[1] != 1:
        raise ValueError(f"a per-head attention mask (shape {tuple(vis.shape)}) cannot be expressed: LSSA/LSSAR take "
                         f"a causal flag and a key padding mask shared by all heads")
    if vis.shape[-1] < Lk:
        raise ValueError(f"attention mask covers {vis.shape[-1]} keys but there are {Lk}")
    return vis[..., :Lk]


def _packed(vis: torch.Tensor) -> torch.Tensor | None:
    """``cu_seqlens`` when ``vis`` ``[L, L]`` is causal within consecutive blocks and empty across them (packed
    sequences), else None."""
    L = vis.shape[-1]
    if not bool(vis.diagonal().all()):
        return None
    first = vis.to(torch.int8).argmax(-1)  # first visible key of each row = the start of its sequence
    starts = torch.unique(first)
    if int(starts[0]) != 0:
        return None
    cu = torch.cat([starts, torch.tensor([L], device=vis.device)]).to(torch.int64)
    seg = torch.bucketize(torch.arange(L, device=vis.device), cu[1:], right=True)
    want = (seg[:, None] == seg[None, :]) & reference.visible_mask(L, L, True, device=vis.device)
    return cu if bool((vis == want).all()) else None


def mask_to_batching(mask: torch.Tensor | None, B: int, Lq: int, Lk: int, causal: bool):
    """HF's 4D attention mask -> ``(keep, key_padding_mask, cu_seqlens)``: the package's semantics, or a ValueError.

    ``keep``: how many leading keys to use (trailing keys that no query sees, e.g. a static cache's unused
    slots, are dropped); ``key_padding_mask``: boolean ``[B, keep]`` (True = real token), or ``None`` when every
    key is real; ``cu_seqlens``: the sequence boundaries when the mask is that of packed sequences (batch 1,
    causal within each sequence: what transformers builds from ``position_ids`` that restart at 0), else None.
    The mask must equal "causal, queries aligned to the last keys, and key padding", or packed sequences:
    anything else (sliding window, chunks, bidirectional blocks) raises.
    """
    if mask is None:
        return Lk, None, None
    vis = _visible(mask, Lk)
    if vis.shape[-2] != Lq or vis.shape[0] not in (1, B):
        raise ValueError(f"attention mask of shape {tuple(vis.shape)} does not fit batch {B}, Lq={Lq}, Lk={Lk}")
    vis = vis.expand(B, 1, Lq, Lk)[:, 0]  # [B, Lq, Lk]
    seen = vis.any(dim=1).any(dim=0)  # keys some query sees
    keep = int(seen.nonzero().max()) + 1 if bool(seen.any()) else Lk
    keep = max(keep, Lq) if causal else keep
    vis = vis[..., :keep]
    if causal:
        kpm = vis[:, -1, :]  # the last query sees every earlier key that is real
        want = reference.visible_mask(Lq, keep, True, device=vis.device)[None] & kpm[:, None, :]
    else:
        kpm = vis.any(dim=1)
        want = kpm[:, None, :].expand(B, Lq, keep)
    # a query at a padding position outputs 0 in the package: its row may also be empty (a custom mask); not
    # anything else (rows of a packed sequence look like padding to the last query, but see their own keys)
    real_q = kpm[:, keep - Lq:]  # [B, Lq]
    if bool(((vis == want).all(-1) | (~real_q & ~vis.any(-1))).all()):
        return keep, (None if bool(kpm.all()) else kpm), None
    cu = _packed(vis[0]) if causal and B == 1 and Lq == keep else None
    if cu is None:
        raise ValueError("this attention mask cannot be expressed by LSSA/LSSAR: they support a causal mask (queries "
                         "aligned to the last keys, as with a KV cache) or none, combined with key padding, or "
                         "packed sequences (batch 1, causal within each); sliding-window, chunked and block masks "
                         "are not supported")
    return keep, None, cu


def _lssa_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, allow_is_causal_skip=True, **kwargs):
    """The mask builder registered with ``AttentionMaskInterface``: HF's boolean mask (``sdpa_mask``), ``None``
    only where a plain causal flag is exact with bottom-right alignment (``Lq == Lk`` or ``Lq == 1``)."""
    skip = allow_is_causal_skip and (q_length == kv_length or q_length == 1)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, allow_is_causal_skip=skip, **kwargs)


def _attend(query, key, value, attention_mask, name, causal, backend, opts):
    """The mask decoded (:func:`mask_to_batching`), then :func:`freeatten_core.attention`; ``[B, H, Lq, D]``."""
    B, _, Lq, _ = query.shape
    keep, kpm, cu = mask_to_batching(attention_mask, B, Lq, key.shape[2], causal)
    key, value = key[:, :, :keep], value[:, :, :keep]  # grouped-query k/v go as they are
    return ops.attention(query, key, value, method=name, causal=causal, backend=backend, key_padding_mask=kpm,
                         cu_seqlens=cu, **opts)


def _opts(name, p, offset_rows):
    return dict(p=p, offset_rows=offset_rows) if name == "lssar" else {}


@torch.library.custom_op("freeatten::hf_attention", mutates_args=())
def hf_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                 method: str, causal: bool, backend: str, p: float, offset_rows: int) -> torch.Tensor:
    """:func:`_attend` as one operator (what a model traced by ``torch.compile`` calls): the mask's values are read
    at run time, inside. ``p``, ``offset_rows``: used by ``lssar`` only."""
    with torch.no_grad():
        out = _attend(query, key, value, attention_mask, method, causal, backend, _opts(method, p, offset_rows))
    return out.contiguous().clone()


@hf_attention.register_fake
def _(query, key, value, attention_mask, method, causal, backend, p, offset_rows):
    return query.new_empty(query.shape)


@torch.library.custom_op("freeatten::hf_attention_backward", mutates_args=())
def hf_attention_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, method: str, causal: bool, backend: str, p: float,
                          offset_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`hf_attention`: the forward recomputed under autograd (as in :mod:`..attention.ops`)."""
    with ops._autograd_inside_operator(), torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
        out = _attend(q, k, v, attention_mask, method, causal, backend, _opts(method, p, offset_rows))
        grads = torch.autograd.grad(out, (q, k, v), grad, allow_unused=True)
    return tuple(t.new_zeros(t.shape) if g is None else g.contiguous().clone() for g, t in zip(grads, (q, k, v)))


@hf_attention_backward.register_fake
def _(grad, query, key, value, attention_mask, method, causal, backend, p, offset_rows):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output):
    query, key, value, attention_mask, *args = inputs
    ctx.save_for_backward(query, key, value)
    ctx.mask, ctx.args = attention_mask, args


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = hf_attention_backward(grad.contiguous(), q, k, v, ctx.mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


hf_attention.register_autograd(_backward, setup_context=_setup_context)


def make_attention_function(method: str = "lssar", backend: str = "auto", **options):
    """An ``AttentionInterface`` function computing ``method`` with :func:`freeatten_core.attention`.

    ``options`` are the method's options (``p``, ``offset_rows`` for ``lssar``), checked here by the registry.
    """
    m, opts = resolve(method, options)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    name = m.name

    def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
        for kw in _UNSUPPORTED_KWARGS:
            if kwargs.get(kw) is not None:
                raise ValueError(f"attn_implementation={name!r} does not support {kw}={kwargs[kw]!r} (LSSA/LSSAR "
                                 f"attend to every visible key with their own scores); use a model config without it")
        if dropout:
            raise ValueError(f"attn_implementation={name!r} does not support attention dropout (got {dropout}); set "
                             f"config.attention_dropout = 0.0")
        D = query.shape[-1]
        if (name not in UNIT_SPHERE_METHODS and scaling is not None
                and not math.isclose(scaling, 1 / math.sqrt(D), rel_tol=1e-6)):
            raise ValueError(f"method {name!r} scales scores by 1/sqrt(head_dim) = {1 / math.sqrt(D):.6g}; the model "
                             f"asks for scaling={scaling}")
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        H, Hkv = query.shape[1], key.shape[1]
        if H % Hkv:
            raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
        if torch.compiler.is_compiling() and name in FUSED_METHODS:
            # reading the mask's values would break the graph: decoding and attention run inside one operator
            full = {**REGISTRY["lssar"].options, **opts}
            out = hf_attention(query, key, value, attention_mask, name, causal, backend, float(full["p"]),
                               int(full["offset_rows"]))
        else:
            out = _attend(query, key, value, attention_mask, name, causal, backend, opts)
        return out.transpose(1, 2).contiguous(), None

    attention_forward.__name__ = f"{name}_attention_forward"
    attention_forward.__doc__ = f"{name} attention for transformers models (see freeatten_core.integrations.transformers)."
    return attention_forward


def register(methods=("lssa", "lssar"), backend: str = "auto", **options) -> tuple[str, ...]:
    """Register each of ``methods`` with ``transformers`` under its own name; returns the names.

    Afterwards ``from_config(cfg, attn_implementation="lssar")`` (or ``model.set_attn_implementation("lssar")``)
    uses it. ``options`` go to every method that has them (``p``, ``offset_rows``: the re-weighting methods);
    an option that none of ``methods`` takes raises. Registering again replaces the earlier registration.
    """
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    if not methods:
        raise ValueError("methods must name at least one method")
    for m in methods:
        if m not in REGISTRY:
            resolve(m, {})  # the registry's error: unknown method and the valid names
    unused = [o for o in options if not any(o in REGISTRY[m].options for m in methods)]
    if unused:
        raise ValueError(f"option(s) {', '.join(map(repr, unused))} are taken by none of {', '.join(methods)} "
                         f"(options: " + "; ".join(f"{m}: {', '.join(REGISTRY[m].options) or 'none'}"
                                                   for m in methods) + ")")
    for m in methods:
        fn = make_attention_function(m, backend, **{o: v for o, v in options.items() if o in REGISTRY[m].options})
        AttentionInterface.register(m, fn)
        AttentionMaskInterface.register(m, _lssa_mask)
    return methods


__all__ = ["register", "make_attention_function", "mask_to_batching", "UNIT_SPHERE_METHODS"]
