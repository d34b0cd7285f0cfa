"""The split-key decoding kernel (decode_kernels.py) against the float64 reference, and when the API uses it.

Runs on a GPU or in the Triton interpreter (TRITON_INTERPRET=1, as ``make test`` sets it). Every buffer the kernel
writes is allocated filled with NaN first (``poison_outputs``), so a position it forgets to write shows up.
"""

from __future__ import annotations

import pytest
import torch

import freeatten_core as fa
from freeatten_core.attention import api, batching, reference

triton = pytest.importorskip("triton")
from freeatten_core.attention import decode_kernels as dk  # noqa: E402

if not (dk.INTERPRET or torch.cuda.is_available()):
    pytest.skip("the decoding kernel needs a GPU or the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

DEVICE = "cpu" if dk.INTERPRET else "cuda"
TOL = dict(rtol=1e-4, atol=2e-5)  # float32 tiles against float64 (measured errors are about 4e-6)


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def qkv(B, H, Hkv, Lq, Lk, D, seed=0, dtype=torch.float32):
    return rand(B, H, Lq, D, seed=seed, dtype=dtype), rand(B, Hkv, Lk, D, seed=seed + 1, dtype=dtype), \
        rand(B, Hkv, Lk, D, seed=seed + 2, dtype=dtype)


def expected(q, k, v, method, causal, mask=None, **opts):
    vis = None if mask is None else batching.padding_visibility(mask, q.shape[2])
    return reference.attention(q.double(), k.double(), v.double(), method, causal, vis, **opts)


def spans(mask):
    start, end, ok = batching.padding_spans(mask)
    assert bool(ok.all())
    return start, end


@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,D,causal", [
    (2, 4, 2, 1, 61, 16, True),   # one query, GQA, odd cache length
    (1, 2, 2, 3, 37, 32, True),
    (1, 4, 1, 16, 53, 16, True),  # multi-query, the most query rows
    (2, 2, 1, 3, 29, 16, False),
    (1, 8, 1, 16, 20, 16, True),  # 128 folded rows: two row blocks
])
def test_decode_matches_reference(method, B, H, Hkv, Lq, Lk, D, causal):
    q, k, v = qkv(B, H, Hkv, Lq, Lk, D, seed=Lk)
    with dk.poison_outputs():
        o = dk.attention(q, k, v, method, causal, chunk=16)  # several chunks: the combine step is exercised
    assert o.dtype == q.dtype and not torch.isnan(o).any()
    torch.testing.assert_close(o.double(), expected(q, k, v, method, causal), **TOL)


@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("Lq", [1, 3, 16])
def test_decode_with_padding(method, Lq):
    """Left padding (a prompt shorter than the batch's), right padding (queries at padding positions output 0),
    an all-real row and an all-padding row."""
    Lk = 41
    q, k, v = qkv(4, 2, 1, Lq, Lk, 16, seed=7 + Lq)
    mask = torch.zeros(4, Lk, dtype=torch.bool, device=DEVICE)
    mask[0, 9:] = True
    mask[1, : Lk - 2] = True
    mask[2, :] = True
    start, end = spans(mask)
    with dk.poison_outputs():
        o = dk.attention(q, k, v, method, True, start=start, end=end, chunk=16)
    torch.testing.assert_close(o.double(), expected(q, k, v, method, True, mask), **TOL)
    assert torch.all(o[3] == 0) and torch.all(o[1, :, Lq - 2:] == 0)


@pytest.mark.parametrize("p,offset_rows", [(15.0, 3), (2.5, 0), (1.0, 3)])
def test_decode_lssar_options(p, offset_rows):
    q, k, v = qkv(1, 2, 1, 3, 33, 16, seed=3)
    o = dk.attention(q, k, v, "lssar", True, p=p, offset_rows=offset_rows, chunk=16)
    torch.testing.assert_close(o.double(), expected(q, k, v, "lssar", True, p=p, offset_rows=offset_rows), **TOL)


def test_decode_uniform_rows_and_short_caches():
    """Every key equal: LSSAR rows are uniform and keep their LSSA weights (the running mean of v). A cache of
    Lk = Lq (the first rows see 1, 2, ... keys, the offset O_i = 0 rows)."""
    q, _, v = qkv(1, 2, 2, 4, 19, 16, seed=5)
    k = torch.ones(1, 2, 19, 16, device=DEVICE)
    o = dk.attention(q, k, v, "lssar", True, chunk=16)
    torch.testing.assert_close(o.double(), expected(q, k, v, "lssar", True), **TOL)
    q, k, v = qkv(1, 2, 1, 5, 5, 16, seed=6)
    torch.testing.assert_close(dk.attention(q, k, v, "lssar", True).double(), expected(q, k, v, "lssar", True), **TOL)


def test_decode_reads_a_strided_cache_in_place():
    """A slice of a preallocated cache ([B, H_kv, L_max, D], the first Lk positions filled) is read through its
    strides."""
    cache_k, cache_v = (rand(2, 2, 64, 16, seed=s) for s in (1, 2))
    q = rand(2, 4, 1, 16, seed=3)
    k, v = cache_k[:, :, :45], cache_v[:, :, :45]
    assert not k.is_contiguous()
    torch.testing.assert_close(dk.attention(q, k, v, "lssar", True, chunk=32).double(),
                               expected(q, k.contiguous(), v.contiguous(), "lssar", True), **TOL)


def rel_err(x, r):
    """RMS(x − r) / RMS(r) in float64."""
    x, r = x.double(), r.double()
    return ((x - r).square().mean().sqrt() / r.square().mean().sqrt()).item()


@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision(dtype, method):
    """Half-precision inputs, with the GPU's operand rounding (q̃, k/m in float16, the weights in v's dtype; on a
    GPU the real thing, in the interpreter emulated): within the kernels' GPU target of 1e-2 relative to float64
    (the output's own rounding to bfloat16 is 2^-9 = 2e-3)."""
    q, k, v = qkv(1, 4, 2, 2, 40, 32, seed=9, dtype=dtype)
    want = expected(q, k, v, method, True)
    with dk.emulate_gpu_dots():
        o = dk.attention(q, k, v, method, True, chunk=16)
    assert o.dtype == dtype and rel_err(o, want) < 1e-2


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN matmul
def test_decode_nan_policy(monkeypatch):
    """A NaN/Inf in a padding key touches nothing (the kernels never read it: one run); one in a real key makes
    NaN exactly the rows that see it (the kernels count it, and the step runs again on the finite part)."""
    runs = []
    real = dk.decode
    monkeypatch.setattr(dk, "decode", lambda *a, **kw: (runs.append(1), real(*a, **kw))[1])
    q, k, v = qkv(2, 2, 1, 3, 20, 16, seed=11)
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    mask[0, :4] = False
    start, end = spans(mask)
    kb, vb = k.clone(), v.clone()
    kb[0, 0, 1, 2] = float("nan")
    vb[0, 0, 2, 0] = float("inf")
    with dk.poison_outputs():
        o = dk.attention(q, kb, vb, "lssar", True, start=start, end=end, chunk=16)
    torch.testing.assert_close(o.double(), expected(q, k, v, "lssar", True, mask), **TOL)
    assert len(runs) == 1
    for method in ("lssa", "lssar"):
        kv = kb.clone()
        kv[1, 0, 18, 5] = float("nan")  # seen by the last two query rows (positions 18, 19) of batch element 1
        assert int(real(q, kv, vb, method == "lssar", True, start, end, chunk=16)[1]) > 0
        with dk.poison_outputs():
            o = dk.attention(q, kv, vb, method, True, start=start, end=end, chunk=16)
        assert torch.isnan(o[1, :, 1:]).all() and not torch.isnan(o[1, :, 0]).any() and not torch.isnan(o[0]).any()
        torch.testing.assert_close(o[1, :, 0].double(), expected(q, k, v, method, True, mask)[1, :, 0], **TOL)
        vv = v.clone()
        vv[1, 0, 0, 3] = float("-inf")  # column 3 of every row of batch element 1 (each sees key 0)
        o = dk.attention(q, k, vv, method, True, start=start, end=end, chunk=16)
        assert torch.isnan(o[1, :, :, 3]).all() and not torch.isnan(o[1, :, :, :3]).any()


def test_api_dispatches_decoding_calls(monkeypatch):
    """backend='triton' (or 'auto' on CUDA) sends Lq <= 16 calls that need no gradient to the decoding kernel,
    with the padding mask as start/end; calls that need a gradient, or have more queries, go elsewhere."""
    calls = []
    real = dk.decode
    monkeypatch.setattr(dk, "decode", lambda *a, **kw: (calls.append(a[0].shape), real(*a, **kw))[1])
    backend = "triton" if dk.INTERPRET else "auto"
    q, k, v = qkv(2, 4, 2, 2, 30, 16, seed=13)
    mask = torch.ones(2, 30, dtype=torch.int64, device=DEVICE)
    mask[1, :7] = 0
    with torch.no_grad():
        o = fa.attention(q, k, v, "lssar", backend=backend, key_padding_mask=mask)
    assert len(calls) == 1
    torch.testing.assert_close(o.double(), expected(q, k, v, "lssar", True, mask.bool()), **TOL)
    o = fa.attention(q, k, v, "lssa", backend=backend)  # no input requires grad: decoding too
    assert len(calls) == 2
    torch.testing.assert_close(o.double(), expected(q, k, v, "lssa", True), **TOL)
    qg = q.clone().requires_grad_(True)
    fa.attention(qg, k, v, "lssa", backend=backend)  # a gradient is needed: not the decoding kernel
    assert len(calls) == 2
    assert api.DECODE_MAX_QUERIES == dk.MAX_QUERIES == 16


def test_decode_bad_calls():
    q, k, v = qkv(1, 2, 1, 2, 8, 16)
    with pytest.raises(ValueError, match="implements 'lssa' and 'lssar', not 'softmax'"):
        dk.attention(q, k, v, "softmax", True)
    with pytest.raises(ValueError, match="head dim 24"):
        dk.attention(rand(1, 2, 2, 24), rand(1, 1, 8, 24), rand(1, 1, 8, 24), "lssa", True)
    with pytest.raises(ValueError, match="at most 16 query rows, got 17"):
        dk.attention(rand(1, 1, 17, 16), rand(1, 1, 20, 16), rand(1, 1, 20, 16), "lssa", True)
    with pytest.raises(ValueError, match="both start and end"):
        dk.attention(q, k, v, "lssa", True, start=torch.zeros(1, dtype=torch.int64))


def test_threshold_coefficients_are_the_reference_threshold():
    """The kernel forms τ_i from three coefficients read off reference.uniform_threshold: they reproduce it."""
    t0, tc, tn = dk._tau_coefficients(64)
    c = torch.tensor([0.0, 3.5, 40.0], dtype=torch.float64)
    N = torch.tensor([1.0, 100.0, 65536.0], dtype=torch.float64)
    torch.testing.assert_close(t0 + tc * c + tn * N, reference.uniform_threshold(c, N, 64, torch.float32),
                               rtol=1e-12, atol=0)
