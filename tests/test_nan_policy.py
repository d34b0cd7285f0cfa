"""The NaN and Inf policy ("Decisions" page, "NaN and Inf"), for every method and backend, forward and backward:

an output is NaN exactly when it depends on a non-finite (NaN, +Inf, -Inf) input element, never a plausible
number; every other output is what the finite inputs give; and the same for gradients.

The dependencies are written out here independently of the package: output o_id of query row i depends on q_i,
on every key k_j the row sees and on v_jd of those keys; a weight w_ij of a normalised method depends on q_i
and every key the row sees, of an unnormalised one on q_i and k_j only; invisible (masked) weights are 0 and
depend on nothing.
"""

import math

import numpy as np
import pytest
import torch

import freeatten_core as fa
from freeatten_core.attention.methods import FUSED_METHODS, REGISTRY

BAD_VALUES = (float("nan"), float("inf"), float("-inf"))
# (Lq, Lk, causal): self-attention, decoding (Lq < Lk, aligned to the last keys) and non-causal
SHAPES = ((6, 6, True), (3, 7, True), (4, 5, False))
D = 16  # the smallest head dim the fused kernels take


def visible(Lq, Lk, causal):
    i = np.arange(Lq)[:, None] + (Lk - Lq)
    j = np.arange(Lk)[None, :]
    return (j <= i) if causal else np.ones((Lq, Lk), bool)


def inputs(seed, Lq, Lk, dtype):
    """Random q, k, v ``[1, 2, L, D]`` and the same with a few non-finite elements in random places."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, D, generator=g, dtype=torch.float64).to(dtype) for n in (Lq, Lk, Lk))
    bad = [x.clone() for x in (q, k, v)]
    which = rng.choice(3, size=rng.integers(1, 4), replace=True)  # 1 to 3 bad elements in q, k or v
    for t in which:
        x = bad[t]
        idx = (0, int(rng.integers(2)), int(rng.integers(x.shape[2])), int(rng.integers(D)))
        x[idx] = BAD_VALUES[int(rng.integers(3))]
    return (q, k, v), bad


def expected_nan_outputs(bq, bk, bv, vis):
    """[B, H, Lq, D] from the bad rows of q [B, H, Lq], k [B, H, Lk] and the bad elements of v [B, H, Lk, D]."""
    rows = bq | (bk[..., None, :] & vis).any(-1)  # [B, H, Lq]
    cols = (bv[..., None, :, :] & vis[..., None]).any(-2)  # [B, H, Lq, D]
    return rows[..., None] | cols


def expected_nan_weights(bq, bk, vis, normalised):
    if normalised:
        rows = bq | (bk[..., None, :] & vis).any(-1)
        return rows[..., None] & vis
    return (bq[..., None] | bk[..., None, :]) & vis


def finite_copy(x, fill):
    return torch.where(torch.isfinite(x), x, torch.full_like(x, fill))


def close(backend, dtype):
    if backend == "reference":
        return dict(rtol=0, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    return dict(rtol=2e-3, atol=2e-3)  # the kernels vs the kernels on other finite fill values: float32 tiles


def cases():
    out = []
    for backend in ("reference", "triton"):
        methods = REGISTRY if backend == "reference" else FUSED_METHODS
        for method in methods:
            for si, shape in enumerate(SHAPES):
                n_seeds = 2 if backend == "reference" else 3
                for seed in range(n_seeds):
                    out.append(pytest.param(backend, method, shape, 100 * si + seed,
                                            id=f"{backend}-{method}-{shape[0]}x{shape[1]}{'c' if shape[2] else ''}"
                                               f"-{seed}"))
    return out


def run(backend, method, q, k, v, causal):
    return fa.attention(q, k, v, method=method, causal=causal, backend=backend)


@pytest.mark.parametrize("backend,method,shape,seed", cases())
def test_attention_output_and_gradients(backend, method, shape, seed):
    Lq, Lk, causal = shape
    dtype = torch.float64 if backend == "reference" and seed % 2 == 0 else torch.float32
    (q0, k0, v0), (q, k, v) = inputs(seed, Lq, Lk, dtype)
    vis = torch.from_numpy(visible(Lq, Lk, causal))
    bq, bk = ~torch.isfinite(q).all(-1), ~torch.isfinite(k).all(-1)
    want = expected_nan_outputs(bq, bk, ~torch.isfinite(v), vis)
    tol = close(backend, dtype)

    # forward: NaN exactly where an output depends on a non-finite input (never ±Inf, never a plausible number)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = run(backend, method, *xs, causal)
    assert torch.equal(torch.isnan(o), want), f"NaN outputs {torch.isnan(o).int()} expected {want.int()}"
    # every other output is what any finite values in the bad places give
    for fill in (0.0, 0.75):
        ref = run(backend, method, *(finite_copy(t, fill) for t in (q, k, v)), causal)
        torch.testing.assert_close(o[~want], ref[~want], **tol)

    # backward, the loss using only the good outputs: finite gradients, equal to those of finite inputs
    g = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    good_g = g.masked_fill(want, 0)
    grads = torch.autograd.grad(o, xs, good_g, retain_graph=True)
    ys = [finite_copy(t, 0.0).requires_grad_(True) for t in (q, k, v)]
    ref_grads = torch.autograd.grad(run(backend, method, *ys, causal), ys, good_g)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert torch.isfinite(a).all(), f"d/d{name} is not finite although the loss uses only good outputs"
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d/d{name}: {m}")

    # backward, the loss using every output: NaN exactly in the gradients of what a NaN output depends on
    gq, gk, gv = torch.autograd.grad(o, xs, g)
    rows = want.any(-1)  # [B, H, Lq]: query rows with a NaN output
    want_q = rows[..., None].expand_as(q)
    want_k = (rows[..., :, None] & vis).any(-2)[..., None].expand_as(k)
    want_v = (want[..., :, None, :] & vis[..., None]).any(-3)
    for name, got, w in (("q", gq, want_q), ("k", gk, want_k), ("v", gv, want_v)):
        assert torch.equal(torch.isnan(got), w), f"NaN pattern of d/d{name}: {torch.isnan(got).int()} != {w.int()}"


@pytest.mark.parametrize("method", list(REGISTRY))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}{'c' if s[2] else ''}")
def test_attention_weights_and_gradients(method, shape):
    Lq, Lk, causal = shape
    _, (q, k, _) = inputs(7 + Lq, Lq, Lk, torch.float64)
    q[0, 1, 0, 3] = float("nan")  # at least one bad element in q and in k
    k[0, 0, Lk - 1, 0] = float("inf")
    vis = torch.from_numpy(visible(Lq, Lk, causal))
    want = expected_nan_weights(~torch.isfinite(q).all(-1), ~torch.isfinite(k).all(-1), vis,
                                REGISTRY[method].normalised)
    xs = [t.clone().requires_grad_(True) for t in (q, k)]
    w = fa.attention_weights(*xs, method=method, causal=causal)
    assert torch.equal(torch.isnan(w), want)
    ref = fa.attention_weights(finite_copy(q, 0.25), finite_copy(k, 0.25), method=method, causal=causal)
    torch.testing.assert_close(w[~want], ref[~want], rtol=0, atol=0)
    assert (w[~vis.expand_as(w)] == 0).all()  # masked weights stay exactly 0
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gq, gk = torch.autograd.grad(w, xs, g.masked_fill(want, 0), retain_graph=True)
    assert torch.isfinite(gq).all() and torch.isfinite(gk).all()
    gq, gk = torch.autograd.grad(w, xs, g)
    used = want  # every NaN weight has a non-zero cotangent here
    assert torch.equal(torch.isnan(gq), used.any(-1)[..., None].expand_as(q))
    if REGISTRY[method].normalised:
        want_k = (used.any(-1)[..., :, None] & vis).any(-2)
    else:
        want_k = used.any(-2)
    assert torch.equal(torch.isnan(gk), want_k[..., None].expand_as(k))


def test_all_finite_inputs_take_the_plain_path_bit_for_bit():
    """The policy costs nothing on finite inputs: same numbers as the formulas computed directly."""
    from freeatten_core.attention import reference as R

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, D, generator=g, dtype=torch.float64) for _ in range(3))
    for method in ("lssar", "softmax_reweight", "relu_l1"):
        w = R._weights(q, k, method, True)
        assert torch.equal(fa.attention(q, k, v, method=method, backend="reference"), w @ v)


def test_l1_of_a_nan_row_is_nan_not_zero():
    """The bug this policy fixed: the ℓ1 guard ``Z > 0`` is false for NaN, so a NaN row came out as zeros."""
    from freeatten_core.attention.reference import l1_normalise

    f = torch.tensor([[0.0, 0.0], [1.0, float("nan")], [1.0, 3.0]])
    out = l1_normalise(f)
    assert torch.equal(out[0], torch.zeros(2)) and torch.isnan(out[1]).all()
    assert torch.allclose(out[2], torch.tensor([0.25, 0.75]))
    assert not math.isnan(out[2, 0])
