"""LSSA / LSSAR as FlexAttention score modifications against the reference (float32, CPU)."""

import math
import warnings

import pytest
import torch

import freeatten_core as fa
from freeatten_core.attention import flex, reference

fx = pytest.importorskip("torch.nn.attention.flex_attention")
from torch._higher_order_ops.flex_attention import math_attention  # noqa: E402


def dense_flex(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False, return_aux=None):
    """FlexAttention's semantics through PyTorch's dense implementation of it (plain autograd: CPU gradients)."""
    if enable_gqa:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    bm = block_mask.as_tuple() if block_mask is not None else (lambda b, h, i, j: i >= 0,)
    out, lse, mx = math_attention(q, k, v, score_mod or (lambda s, b, h, i, j: s), bm,
                                  1 / math.sqrt(q.shape[-1]) if scale is None else scale, {})
    out = torch.where(torch.isfinite(lse)[..., None], out, torch.zeros_like(out))  # rows that see no key: 0
    if return_aux is None:
        return out
    return out, fx.AuxOutput(lse=lse * math.log(2), max_scores=mx * math.log(2) if return_aux.max_scores else None)


def inputs(B=2, H=4, Hkv=2, Lq=13, Lk=13, D=16, seed=0, padding=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k, v = torch.randn(2, B, Hkv, Lk, D, generator=g).unbind(0)
    kpm = None
    if padding:
        kpm = torch.ones(B, Lk, dtype=torch.bool)
        kpm[-1, :3] = False  # left padding in the last batch element
    return q, k, v, kpm


def test_flex_attention_forward_equals_reference():
    """The real FlexAttention (eager: PyTorch runs it on the CPU forward-only; a few seconds, most of them its
    first call), odd lengths, grouped queries, key padding, Lq < Lk (queries aligned to the last keys)."""
    q, k, v, kpm = inputs(Lq=5, Lk=13)
    causal = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        for method in ("lssa", "lssar"):
            got = getattr(flex, method)(q, k, v, causal, key_padding_mask=kpm)
            want = fa.attention(q, k, v, method, causal, "reference", key_padding_mask=kpm)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method,causal,Lq,Lk,padding", [("lssa", True, 11, 11, True), ("lssar", True, 11, 11, True),
                                                         ("lssar", False, 7, 9, False), ("lssar", True, 1, 9, True)])
def test_gradients_equal_reference(method, causal, Lq, Lk, padding):
    q, k, v, kpm = inputs(Lq=Lq, Lk=Lk, padding=padding, seed=3)
    opts = dict(p=7.0, offset_rows=2) if method == "lssar" else {}
    grads = []
    for fn in (lambda *x: getattr(flex, method)(*x, causal, key_padding_mask=kpm, flex=dense_flex, **opts),
               lambda *x: fa.attention(*x, method, causal, "reference", key_padding_mask=kpm, **opts)):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        grads.append((out, *torch.autograd.grad(out, x, g)))
    for a, b in zip(*grads):  # float32; p amplifies rounding in the gradients (relative error up to ~4e-6 seen)
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_uniform_rows_keep_lssa_weights():
    """Every key equal: each row is exactly uniform, M_i <= tau_i, and both the reference and the Flex recipe keep
    the LSSA weights (the mean of the visible values) instead of re-weighting rounding noise."""
    q, _, v, _ = inputs(H=2, Hkv=2, Lq=9, Lk=9, padding=False)
    k = torch.randn(1, 1, 1, 16).expand(2, 2, 9, 16).contiguous()
    got = flex.lssar(q, k, v, True, flex=dense_flex)
    want = fa.attention(q, k, v, "lssar", True, "reference")
    mean = v.cumsum(2) / torch.arange(1, 10)[:, None]
    torch.testing.assert_close(want, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_masks_and_errors():
    mm = flex.mask_mod(3, 5, True)
    i, j = torch.arange(3)[:, None], torch.arange(5)[None, :]
    assert torch.equal(mm(0, 0, i, j), reference.visible_mask(3, 5, True))
    assert flex.mask_mod(3, 5, False) is None
    q, k, v, kpm = inputs()
    with pytest.raises(ValueError, match="option p"):
        flex.lssar(q, k, v, p=0.5)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        flex.lssa(q, k, v, key_padding_mask=kpm[:, :4])
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        flex.lssa(q[:, :3], k, v)
