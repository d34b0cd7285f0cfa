"""Grouped-query attention, key padding masks and packed sequences: what ``attention`` promises for each.

Each property is checked against a call that needs none of the new machinery: GQA against K/V repeated per query
head, a padded row against the same tokens alone, packed sequences against separate calls.
"""

from __future__ import annotations

import pytest
import torch

import freeatten_core as fa
from freeatten_core.attention import api, batching, reference
from freeatten_core.attention.methods import METHODS, REGISTRY


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def qkv(B, H, Hkv, Lq, Lk, D=16, seed=0, dtype=torch.float64):
    return rand(B, H, Lq, D, seed=seed, dtype=dtype), rand(B, Hkv, Lk, D, seed=seed + 1, dtype=dtype), \
        rand(B, Hkv, Lk, D, seed=seed + 2, dtype=dtype)


def repeat_kv(x, H):
    return x.repeat_interleave(H // x.shape[1], dim=1)


def ref(q, k, v, method, causal=True, **kw):
    return fa.attention(q, k, v, method=method, causal=causal, backend="reference", **kw)


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    out.backward(rand(*out.shape, seed=99, dtype=out.dtype))
    return out.detach(), [x.grad for x in xs]


EXACT = dict(rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Grouped-query attention
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("H,Hkv,Lq,Lk,causal", [(4, 2, 5, 7, True), (3, 1, 6, 6, False)])
def test_gqa_equals_repeated_kv(method, H, Hkv, Lq, Lk, causal):
    q, k, v = qkv(2, H, Hkv, Lq, Lk)
    torch.testing.assert_close(ref(q, k, v, method, causal), ref(q, repeat_kv(k, H), repeat_kv(v, H), method, causal),
                               **EXACT)
    w = fa.attention_weights(q, k, method, causal)
    torch.testing.assert_close(w, fa.attention_weights(q, repeat_kv(k, H), method, causal), **EXACT)


@pytest.mark.parametrize("method,opts", [("lssar", {}), ("lssa", {}), ("softmax", {}),
                                         ("ssmax", {"s": torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)})])
def test_gqa_gradients_are_group_sums(method, opts):
    H, Hkv = 4, 2
    q, k, v = qkv(1, H, Hkv, 6, 6, seed=3)
    o1, (dq1, dk1, dv1) = grads(lambda a, b, c: ref(a, b, c, method, **opts), q, k, v)
    o2, (dq2, dk2, dv2) = grads(lambda a, b, c: ref(a, repeat_kv(b, H), repeat_kv(c, H), method, **opts), q, k, v)
    torch.testing.assert_close(o1, o2, **EXACT)
    torch.testing.assert_close(dq1, dq2, **EXACT)
    torch.testing.assert_close(dk1, dk2, **EXACT)  # autograd of repeat_interleave is the sum over the group
    torch.testing.assert_close(dv1, dv2, **EXACT)
    # and written out: dk of key head hk is the sum over its query heads of the repeated call's dk
    _, (_, dkr, _) = grads(lambda a, b, c: ref(a, b, c, method, **opts), q, repeat_kv(k, H), repeat_kv(v, H))
    torch.testing.assert_close(dk1, dkr.reshape(1, Hkv, H // Hkv, 6, 16).sum(2), **EXACT)


def test_gqa_reference_does_not_repeat_kv(monkeypatch):
    """The reference never materialises K/V per query head: repeat_interleave and expand+reshape of k/v are not
    called, and the score tensor has H_kv heads."""
    q, k, v = qkv(1, 8, 1, 4, 4)
    seen = []
    orig = reference.dot_scores
    monkeypatch.setattr(reference, "dot_scores", lambda a, b: (seen.append(b.shape), orig(a, b))[1])
    monkeypatch.setitem(reference.WEIGHT_FUNCTIONS, "softmax", reference._softmax)
    ref(q, k, v, "softmax")
    assert seen and all(s[1] == 1 for s in seen)


# --------------------------------------------------------------------------------------------------------
# Key padding masks
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_row_equals_prompt_alone(method):
    """Row 1 is a prompt of 4 tokens left-padded to 7; its outputs equal the prompt alone, padding outputs 0."""
    H, Hkv, L, pad = 4, 2, 7, 3
    q, k, v = qkv(2, H, Hkv, L, L, seed=5)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, :pad] = False
    o = ref(q, k, v, method, key_padding_mask=mask)
    alone = ref(q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:], method)
    torch.testing.assert_close(o[1:, :, pad:], alone, **EXACT)
    assert torch.all(o[1, :, :pad] == 0)
    torch.testing.assert_close(o[:1], ref(q[:1], k[:1], v[:1], method), **EXACT)  # an all-real row is unchanged


@pytest.mark.parametrize("method", ["lssar", "lssa", "softmax", "sigmoid", "relu", "linear"])
def test_right_padding_and_decoding_with_padding(method):
    """Right padding: the real prefix equals the prefix alone. Decoding (Lq < Lk) with a left-padded cache: the
    queries sit at the last Lq positions and see the real keys before them."""
    q, k, v = qkv(2, 2, 2, 6, 6, seed=7)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.int64)  # Hugging Face's 0/1 mask
    o = ref(q, k, v, method, key_padding_mask=mask)
    torch.testing.assert_close(o[:1, :, :4], ref(q[:1, :, :4], k[:1, :, :4], v[:1, :, :4], method), **EXACT)
    assert torch.all(o[0, :, 4:] == 0)
    torch.testing.assert_close(o, ref(q, k, v, method, key_padding_mask=mask.bool()), rtol=0, atol=0)
    # decoding: 2 queries against a cache of 6 with 2 padding keys on the left of row 1
    qd = q[:, :, -2:]
    dmask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    od = ref(qd, k, v, method, key_padding_mask=dmask)
    torch.testing.assert_close(od[1:], ref(qd[1:], k[1:, :, 2:], v[1:, :, 2:], method), **EXACT)


@pytest.mark.parametrize("method", ["lssar", "lssa", "softmax", "ssmax", "sigmoid_l1_reweight"])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_with_holes_equals_the_real_tokens_alone(method, causal):
    """A mask whose real tokens are not one block (reference only): N_i counts only the real keys, so the real
    rows equal the call on the real tokens alone."""
    q, k, v = qkv(1, 2, 1, 8, 8, seed=11)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    real = mask[0].nonzero()[:, 0]
    o = ref(q, k, v, method, causal, key_padding_mask=mask)
    torch.testing.assert_close(o[:, :, real], ref(q[:, :, real], k[:, :, real], v[:, :, real], method, causal),
                               **EXACT)
    assert torch.all(o[:, :, ~mask[0]] == 0)


@pytest.mark.parametrize("method", ["lssar", "lssa", "softmax", "relu"])
def test_padding_gets_zero_gradients(method):
    q, k, v = qkv(2, 2, 1, 5, 5, seed=13)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    _, (dq, dk, dv) = grads(lambda a, b, c: ref(a, b, c, method, key_padding_mask=mask), q, k, v)
    assert torch.all(dq[0, :, :2] == 0) and torch.all(dk[0, :, :2] == 0) and torch.all(dv[0, :, :2] == 0)
    assert dq[0, :, 3:].abs().sum() > 0 and dv[0, :, 2:].abs().sum() > 0  # the real rows do get gradients
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_gradcheck_with_padding_and_gqa():
    q, k, v = qkv(2, 2, 1, 4, 5, D=4, seed=17)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    for method in ("lssar", "lssa", "softmax"):
        xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        assert torch.autograd.gradcheck(lambda a, b, c: ref(a, b, c, method, key_padding_mask=mask), xs)


@pytest.mark.parametrize("method", METHODS)
def test_nan_in_padding_does_not_poison_real_rows(method):
    """The NaN policy with a mask: a NaN/Inf at a padding position of k, v (or of a padding query) touches no
    output and no gradient; a NaN in a real key reaches exactly the rows that see it."""
    q, k, v = qkv(2, 2, 1, 6, 6, seed=19)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    qb, kb, vb = q.clone(), k.clone(), v.clone()
    kb[0, 0, 1, 3] = float("nan")
    vb[0, 0, 0, 2] = float("inf")
    qb[0, 1, 0, 5] = float("nan")
    o_clean = ref(q, k, v, method, key_padding_mask=mask)
    o, (dq, dk, dv) = grads(lambda a, b, c: ref(a, b, c, method, key_padding_mask=mask), qb, kb, vb)
    torch.testing.assert_close(o, o_clean, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    w = fa.attention_weights(qb, kb, method, key_padding_mask=mask)
    torch.testing.assert_close(w, fa.attention_weights(q, k, method, key_padding_mask=mask), **EXACT)
    # a NaN in a real key poisons the rows that see it (row 3 on: the key sits at position 3), not those before
    kb[0, 0, 3, 0] = float("nan")
    o = ref(qb, kb, vb, method, key_padding_mask=mask)
    assert torch.isnan(o[0, :, 3:]).any(-1).all() and not torch.isnan(o[0, :, :3]).any()
    assert not torch.isnan(o[1]).any()


@pytest.mark.parametrize("method", ["lssar", "softmax", "relu"])
def test_attention_weights_with_gqa_and_mask(method):
    q, k, _ = qkv(2, 4, 2, 5, 5, seed=23)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w = fa.attention_weights(q, k, method, key_padding_mask=mask)
    assert w.shape == (2, 4, 5, 5)
    assert torch.all(w[0, :, 0] == 0) and torch.all(w[0, :, :, 0] == 0)
    torch.testing.assert_close(w[0, :, 1:, 1:], fa.attention_weights(q[:1, :, 1:], k[:1, :, 1:], method)[0], **EXACT)
    if REGISTRY[method].normalised:
        torch.testing.assert_close(w[0, :, 1:].sum(-1), torch.ones(4, 4, dtype=w.dtype), **EXACT)


# --------------------------------------------------------------------------------------------------------
# Packed sequences
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_packed_equals_separate_calls(method, causal):
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q, k, v = qkv(1, 4, 2, 9, 9, seed=29)
    o = ref(q, k, v, method, causal, cu_seqlens=cu)
    parts = [ref(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], method, causal) for a, b in zip(cu[:-1].tolist(),
                                                                                         cu[1:].tolist())]
    torch.testing.assert_close(o, torch.cat(parts, dim=2), **EXACT)


def test_packed_gradients_equal_separate_calls():
    cu = torch.tensor([0, 5, 8])
    q, k, v = qkv(1, 2, 1, 8, 8, seed=31)
    _, g1 = grads(lambda a, b, c: ref(a, b, c, "lssar", cu_seqlens=cu), q, k, v)
    _, g2 = grads(lambda a, b, c: torch.cat([ref(a[:, :, :5], b[:, :, :5], c[:, :, :5], "lssar"),
                                             ref(a[:, :, 5:], b[:, :, 5:], c[:, :, 5:], "lssar")], dim=2), q, k, v)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, **EXACT)


# --------------------------------------------------------------------------------------------------------
# The sequence descriptors of the fused kernels stand for the reference's visibility
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Lq", [7, 3, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_descriptors_mean_the_reference_visibility(Lq, causal):
    Lk = 7
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [0] * 7, [0, 0, 0, 0, 0, 0, 1]],
                        dtype=torch.bool)
    seqs = batching.padding_seqs(mask, Lq)
    assert seqs.dtype == torch.int32 and seqs.shape[1] == 5
    want = reference.visibility(Lq, Lk, causal, batching.padding_visibility(mask, Lq))
    got = batching.seqs_visibility(seqs, mask.shape[0], Lq, Lk, causal)
    assert torch.equal(got, want.expand_as(got))


@pytest.mark.parametrize("causal", [True, False])
def test_packed_descriptors_mean_the_reference_visibility(causal):
    cu = torch.tensor([0, 2, 3, 8])
    seqs = batching.packed_seqs(cu)
    assert seqs.tolist() == [[0, 0, 2, 0, 2], [0, 2, 3, 2, 3], [0, 3, 8, 3, 8]]
    want = reference.visibility(8, 8, causal, batching.packed_visibility(cu, 8))
    assert torch.equal(batching.seqs_visibility(seqs, 1, 8, 8, causal), want)
    assert torch.equal(batching.seqs_visibility(batching.dense_seqs(2, 3, 5), 2, 3, 5, causal),
                       reference.visibility(3, 5, causal, torch.ones(2, 1, 3, 5, dtype=torch.bool)))


def test_non_contiguous_mask_has_no_descriptors():
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)
    assert "row 1" in batching.non_contiguous_reason(mask) and "more than one block" in batching.non_contiguous_reason(
        mask)
    with pytest.raises(ValueError, match="row 1 has its real tokens in more than one block"):
        batching.padding_seqs(mask, 4)
    assert batching.non_contiguous_reason(mask[:1]) is None


# --------------------------------------------------------------------------------------------------------
# SDPA path (softmax on CUDA under backend="auto"), exercised on the CPU
# --------------------------------------------------------------------------------------------------------


def test_sdpa_softmax_with_gqa_and_padding():
    q, k, v = qkv(2, 4, 2, 3, 6, seed=37)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    vis = batching.padding_visibility(mask, 3)
    got = api.sdpa_softmax(q, k, v, True, vis)
    torch.testing.assert_close(got, ref(q, k, v, "softmax", key_padding_mask=mask), rtol=1e-10, atol=1e-10)
    assert torch.all(got[1, :, 2] == 0)  # the last query sits at a padding position
    torch.testing.assert_close(api.sdpa_softmax(q, k, v, True), ref(q, k, v, "softmax"), rtol=1e-10, atol=1e-10)
    q1 = q[:, :, -1:]  # one decoding query: no mask at all
    torch.testing.assert_close(api.sdpa_softmax(q1, k, v, True), ref(q1, k, v, "softmax"), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------
# Bad input: an error naming the problem
# --------------------------------------------------------------------------------------------------------

_q, _k, _v = qkv(2, 4, 2, 5, 5, D=8, dtype=torch.float32)
_q1, _k1, _v1 = (x[:1] for x in (_q, _k, _v))


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_q[:, :3], _k, _v), {}, ValueError, r"multiple of the key/value heads.*H = 3.*H_kv = 2"),
    ((_q, _k, _v[:, :1]), {}, ValueError, r"k and v must have the same number of heads"),
    ((_q, _k, _v), dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \[batch, Lk\] = \[2, 5\].*got \(2, 4\)"),
    ((_q, _k, _v), dict(key_padding_mask=torch.ones(2, 1, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape"),
    ((_q, _k, _v), dict(key_padding_mask=torch.ones(2, 5)), TypeError, r"bool or an integer tensor of 0/1.*float32"),
    ((_q, _k, _v), dict(key_padding_mask=torch.full((2, 5), 2)), ValueError, r"only 0 and 1.*\[2\]"),
    ((_q, _k, _v), dict(key_padding_mask=[[1] * 5] * 2), TypeError, r"key_padding_mask must be a torch.Tensor"),
    ((_q, _k, _v), dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError,
     r"key_padding_mask is on meta but q is on cpu"),
    ((_q[:, :, :5], _k[:, :, :3], _v[:, :, :3]),
     dict(causal=False, key_padding_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError,
     r"key_padding_mask needs Lq <= Lk"),
    ((_q1, _k1, _v1), dict(cu_seqlens=torch.tensor([[0, 5]])), ValueError, r"cu_seqlens must be 1-D"),
    ((_q1, _k1, _v1), dict(cu_seqlens=torch.tensor([0.0, 5.0])), TypeError, r"cu_seqlens must be an integer tensor"),
    ((_q1, _k1, _v1), dict(cu_seqlens=torch.tensor([1, 5])), ValueError, r"cu_seqlens must start at 0, got 1"),
    ((_q1, _k1, _v1), dict(cu_seqlens=torch.tensor([0, 3, 3, 5])), ValueError,
     r"strictly increasing.*cu_seqlens\[1\] = 3"),
    ((_q1, _k1, _v1), dict(cu_seqlens=torch.tensor([0, 4, 2, 5])), ValueError, r"strictly increasing"),
    ((_q1, _k1, _v1), dict(cu_seqlens=torch.tensor([0, 2, 4])), ValueError,
     r"must end at the total length T = 5.*got 4"),
    ((_q, _k, _v), dict(cu_seqlens=torch.tensor([0, 5])), ValueError, r"batch size 1.*q \(2, 4, 5, 8\)"),
    ((_q1, _k1, _v1), dict(cu_seqlens=torch.tensor([0, 5]), key_padding_mask=torch.ones(1, 5, dtype=torch.bool)),
     ValueError, r"key_padding_mask or cu_seqlens, not both"),
    ((_q1, _k1, _v1), dict(cu_seqlens=[0, 5]), TypeError, r"cu_seqlens must be a 1-D integer torch.Tensor"),
])
def test_bad_input_is_a_clear_error(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fa.attention(*args, **kwargs)
    if not match.startswith("k and v"):  # every other problem is one of q, k or the batching arguments
        with pytest.raises(exc, match=match):
            fa.attention_weights(*args[:2], **kwargs)


def test_packed_needs_equal_lengths():
    with pytest.raises(ValueError, match="same length T"):
        fa.attention(_q1[:, :, :3], _k1, _v1, causal=True, cu_seqlens=torch.tensor([0, 3]))


def test_triton_backend_names_the_non_contiguous_mask():
    from freeatten_core.attention import triton_kernels as tk
    if not (tk.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a GPU")
    q, k, v = qkv(1, 2, 1, 4, 4, dtype=torch.float32)
    mask = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: key_padding_mask row 0 has its real "
                                         "tokens in more than one block"):
        fa.attention(q, k, v, "lssar", backend="triton", key_padding_mask=mask)
    torch.testing.assert_close(fa.attention(q, k, v, "lssar", backend="auto", key_padding_mask=mask),
                               ref(q, k, v, "lssar", key_padding_mask=mask), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# The fused kernels (backend="triton"): grouped queries, padding and packed sequences through the sequence
# descriptors, against the float64 reference, forward and gradients. Tiny shapes: the interpreter is slow.
# --------------------------------------------------------------------------------------------------------


def _kernels_with_seqs():
    try:
        from freeatten_core.attention import triton_kernels as tk
    except ImportError as e:
        pytest.skip(f"triton is unavailable ({e})")
    if not (tk.INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) or a GPU")
    if not getattr(tk, "SUPPORTS_SEQS", False):
        pytest.skip("this version of the fused kernels takes no sequence descriptors")
    return tk


def rel_err(x, r):
    """RMS(x − r) / RMS(r) in float64 (the absolute RMS error where r is 0)."""
    x, r = x.double(), r.double()
    base = r.square().mean().sqrt().item()
    err = (x - r).square().mean().sqrt().item()
    return err / base if base > 0 else err


FUSED_CASES = {  # name: (B, H, Hkv, Lq, Lk, key_padding_mask rows or cu_seqlens)
    "gqa": (1, 4, 2, 13, 13, None),
    "left-padding": (2, 2, 1, 11, 11, [[1] * 11, [0] * 4 + [1] * 7]),
    "right-padding": (2, 2, 2, 9, 9, [[1] * 6 + [0] * 3, [1] * 9]),
    "decoding-left-padding": (2, 2, 1, 5, 12, [[0] * 3 + [1] * 9, [1] * 12]),
    "packed": (1, 2, 1, 13, 13, "cu"),
}


@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_kernels_match_reference(case, method, monkeypatch):
    tk = _kernels_with_seqs()
    calls = []
    fused = tk.attention
    monkeypatch.setattr(tk, "attention", lambda *a, **kw: (calls.append(kw.get("seqs")), fused(*a, **kw))[1])
    B, H, Hkv, Lq, Lk, extra = FUSED_CASES[case]
    dev = "cuda" if torch.cuda.is_available() and not tk.INTERPRET else "cpu"
    q, k, v = (x.to(dev) for x in qkv(B, H, Hkv, Lq, Lk, seed=41, dtype=torch.float32))
    kw = {}
    if extra == "cu":
        kw["cu_seqlens"] = torch.tensor([0, 4, 11, 13], dtype=torch.int32, device=dev)
    elif extra is not None:
        kw["key_padding_mask"] = torch.tensor(extra, dtype=torch.int64, device=dev)
    do = rand(B, H, Lq, 16, seed=43, dtype=torch.float32).to(dev)
    outs = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        xs = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]  # gradients needed: the fused kernels
        o = fa.attention(*xs, method=method, backend=backend, **kw)
        o.backward(do.to(dtype))
        outs.append([o.detach(), *(x.grad for x in xs)])
    assert len(calls) == 1 and (calls[0] is not None) == bool(kw)
    for name, x, r in zip(("o", "dq", "dk", "dv"), *outs):
        assert x.shape == r.shape and torch.isfinite(x).all(), name
        tol = (2e-5, 1e-4) if dev == "cpu" else (1e-4, 5e-4)  # the kernel tests' float32 tolerances (GPU: FMA order)
        assert rel_err(x, r) <= tol[name != "o"], f"{case} {method} {name}: {rel_err(x, r):.2e}"
    if "key_padding_mask" in kw:  # padding queries: output and gradient exactly 0
        real_q = batching.query_padding(kw["key_padding_mask"].bool(), Lq)
        assert torch.all(outs[0][0][~real_q[:, None, :, None].expand_as(outs[0][0])] == 0)
        assert torch.all(outs[0][1].transpose(1, 2)[~real_q] == 0)


def test_fused_all_padding_batch_is_zero():
    """No query row sees a real token (no sequence descriptor at all): zeros, and zero gradients."""
    _kernels_with_seqs()
    q, k, v = (x.requires_grad_(True) for x in qkv(2, 2, 1, 4, 6, dtype=torch.float32))
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0] * 6], dtype=torch.bool)  # row 0: the queries sit at positions 2..5
    assert batching.padding_seqs(mask, 4).shape[0] == 0
    o = fa.attention(q, k, v, "lssar", backend="triton", key_padding_mask=mask)
    o.sum().backward()
    assert torch.all(o == 0) and torch.all(q.grad == 0) and torch.all(k.grad == 0) and torch.all(v.grad == 0)
