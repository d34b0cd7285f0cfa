"""Fused Triton kernels (LSSA / LSSAR, forward and backward) against the float64 reference.

On a CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by the Makefile and CI; set
here as a default too, which only helps when this module is the first to import the kernels). With CUDA and
without the interpreter, the same tests run on the GPU, plus a GPU section at larger sizes in half precision.

Every launch writes into buffers poisoned with NaN (``poison_outputs``), so a position the kernel forgets to
write fails the test. ``emulate_gpu_dots`` rounds the matmul operands in the interpreter as the GPU path does
for half-precision inputs, so the GPU precision target (1e-2) is checked on the CPU too. Errors are fla-style relative errors: RMS(x − ref) / RMS(ref), against the reference
computed in float64 on the very same (possibly half-rounded) inputs.
"""

from __future__ import annotations

import math
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import freeatten_core  # noqa: E402
from freeatten_core.attention import reference  # noqa: E402
from freeatten_core.attention import triton_kernels as tk  # noqa: E402

ON_GPU = torch.cuda.is_available() and not tk.INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"

# Relative-error thresholds (RMS error / RMS of the float64 reference), per input dtype: (output, gradients).
# Interpreter: every operation is float32, so float32 inputs are checked tightly. Half-precision inputs add two
# roundings: the output to the input dtype, and the unit vectors q̂, k̂ to float16 (the kernels' storage for
# them, on the GPU as here). LSSAR with p = 15 amplifies a score error ~p-fold in its sharp rows, which at
# these tiny lengths makes 1e-2 in dq/dk (measured: up to 1.1e-2 at L = 17; 2e-3 at L = 257); hence 1.5e-2.
# GPU: tensor-core dots in float16/bfloat16 (target: bf16 outputs and gradients within 1e-2 of float64 at real sizes).
TOL = {
    torch.float32: (2e-5, 1e-4) if not ON_GPU else (1e-4, 5e-4),
    torch.float16: (5e-3, 1.5e-2),
    torch.bfloat16: (5e-3, 1.5e-2),
}


@pytest.fixture(autouse=True)
def _poison():
    if not ON_GPU and not tk.INTERPRET:
        pytest.fail("no CUDA device and TRITON_INTERPRET is not 1: run the tests with TRITON_INTERPRET=1 set "
                    "before freeatten_core is imported (the Makefile does)")
    with tk.poison_outputs():
        yield


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """fla-style relative error RMS(x − ref) / RMS(ref) in float64 (the absolute RMS error when ref is 0)."""
    x, ref = x.double(), ref.double()
    err = (x - ref).square().mean().sqrt().item()
    base = ref.square().mean().sqrt().item()
    return err / base if base > 0 else err


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: {(~torch.isfinite(x)).sum().item()} non-finite values"
    e = rel_err(x, ref)
    assert e <= tol, f"{name}: relative error {e:.2e} > {tol:.0e}"


def make_inputs(B, H, Lq, Lk, D, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk, Lq))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def run_kernel(q, k, v, do, method, causal, **opts):
    """Output and (dq, dk, dv) of the fused kernels, through the public API with backend='triton'."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = freeatten_core.attention(q, k, v, method=method, causal=causal, backend="triton", **opts)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def run_reference(q, k, v, do, method, causal, **opts):
    """The same in float64 with the reference (the specification), on the same (rounded) input values."""
    q, k, v = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    o = reference.attention(q, k, v, method, causal, **opts)
    o.backward(do.double().cpu())
    return o.detach(), q.grad, k.grad, v.grad


def check(q, k, v, do, method, causal, tol=None, **opts):
    tol_o, tol_g = tol or TOL[q.dtype]
    got = run_kernel(q, k, v, do, method, causal, **opts)
    ref = run_reference(q, k, v, do, method, causal, **opts)
    assert got[0].dtype == q.dtype, f"output dtype {got[0].dtype} != input dtype {q.dtype}"
    for name, x, r, t in zip(("o", "dq", "dk", "dv"), got, ref, (tol_o, tol_g, tol_g, tol_g)):
        assert x.dtype == q.dtype, f"{name} has dtype {x.dtype}, expected {q.dtype}"
        assert_close(name, x.cpu(), r, t)
    return got, ref


# --------------------------------------------------------------------------------------------------------
# Shapes: lengths 1 to 257 (odd, tile-crossing), Lq < Lk, B and H > 1, head dims 32/64/128, causal on and off
# --------------------------------------------------------------------------------------------------------
SHAPES = [  # (B, H, Lq, Lk, D)
    (2, 3, 1, 1, 32),
    (2, 2, 2, 2, 64),
    (1, 3, 3, 3, 128),
    (2, 2, 4, 4, 32),
    (3, 2, 5, 5, 64),
    (2, 2, 17, 17, 32),
    (1, 2, 100, 100, 128),
    (1, 2, 257, 257, 64),
    (2, 2, 3, 100, 32),  # Lq < Lk: queries aligned to the last keys
    (1, 2, 17, 257, 64),
    (2, 1, 100, 129, 128),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}q{}k{}d{}".format(*s))
def test_forward_backward_fp32(shape, method, causal):
    B, H, Lq, Lk, D = shape
    check(*make_inputs(B, H, Lq, Lk, D, torch.float32, seed=Lq * 7 + Lk), method, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("shape", [(2, 2, 17, 17, 32), (1, 2, 100, 130, 64), (1, 1, 5, 5, 128)],
                         ids=lambda s: "B{}H{}q{}k{}d{}".format(*s))
def test_half_precision(shape, method, dtype):
    B, H, Lq, Lk, D = shape
    check(*make_inputs(B, H, Lq, Lk, D, dtype, seed=3), method, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("shape", [(1, 2, 257, 257, 64), (1, 2, 100, 300, 128)],
                         ids=lambda s: "B{}H{}q{}k{}d{}".format(*s))
def test_gpu_operand_precision(shape, method, dtype):
    # the GPU path's matmul operands (q̂·k̂ in float16, P·V and dO·Vᵀ in the input dtype, dS products in
    # bfloat16), emulated bit-exactly in the interpreter (on a GPU: the real tensor cores), against the
    # GPU target: outputs and gradients within 1e-2 of the float64 reference (measured here: at most 4e-3)
    B, H, Lq, Lk, D = shape
    with tk.emulate_gpu_dots():
        check(*make_inputs(B, H, Lq, Lk, D, dtype, seed=3), method, True, tol=(5e-3, 1e-2))


@pytest.mark.parametrize("p", [1.0, 2.5, 3.0, 100.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("offset_rows", [0, 3, 10])
def test_lssar_options(p, offset_rows):
    # integer p by square-and-multiply (1, 3), general p by exp2/log2 (2.5, and 100 > MAX_INT_P);
    # offset_rows = 10 puts the O = 0 / O = 1 boundary inside the first tile
    check(*make_inputs(2, 2, 33, 40, 32, torch.float32, seed=int(p * 10) + offset_rows), "lssar", True,
          p=p, offset_rows=offset_rows)


def test_p1_without_offset_is_lssa():
    # p = 1 with O_i = 0 on every row gives back LSSA: P = ReLU(N·A)/Σ = A. (O_i = 0 needs N_i <= offset_rows
    # for every row, i.e. offset_rows >= Lk; offset_rows = 0 means O_i = 1 everywhere.)
    q, k, v, do = make_inputs(2, 2, 40, 40, 64, torch.float32, seed=11)
    lssa = run_kernel(q, k, v, do, "lssa", True)
    lssar = run_kernel(q, k, v, do, "lssar", True, p=1.0, offset_rows=40)
    for name, a, b in zip(("o", "dq", "dk", "dv"), lssar, lssa):
        assert_close(name, a, b, 1e-5)


# --------------------------------------------------------------------------------------------------------
# Edge rows
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("case", ["equal_keys", "zero_query"])
def test_exactly_uniform_rows(method, case):
    """Every key equal (or every query zero): each row's weights are exactly uniform, so M_i <= 0 where O_i = 1
    and LSSAR keeps the LSSA weights. The exact output is the running mean of v, and dv_j = Σ_{i >= j} dO_i/N_i.

    Compared with the exact values, not the reference: for equal keys the float64 reference's matmul can round
    a few scores of a row differently (1e-16), and LSSAR, discontinuous at a uniform row, then sharpens that
    noise (the float64 reference is off by up to 1.9 on such rows). For the same reason LSSAR's dq/dk are not
    defined on these rows; LSSA's are, and are compared with the reference (dq of a zero query is not: the
    normalisation of a zero vector has no gradient).
    """
    L = 70
    q, k, v, do = make_inputs(2, 2, L, L, 32, torch.float32, seed=5)
    if case == "equal_keys":
        k = k[:, :, :1].expand_as(k).contiguous()
    else:
        q = torch.zeros_like(q)
    o, dq, dk, dv = run_kernel(q, k, v, do, method, True)
    n = torch.arange(1, L + 1, device=v.device, dtype=torch.float64)[:, None]
    assert_close("o vs running mean of v", o, v.double().cumsum(2) / n, 1e-5)
    dv_exact = (do.double() / n).flip(2).cumsum(2).flip(2)
    assert_close("dv vs exact", dv, dv_exact, 1e-5)
    if method == "lssa":
        ref = run_reference(q, k, v, do, method, True)
        assert_close("dk", dk.cpu(), ref[2], 1e-4)
        if case == "equal_keys":  # dq̂ = c·k̂·Σ_j dS_ij = 0 exactly: the uniform row's gradient cancels
            assert dq.abs().max().item() < 1e-5 * dk.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sharply_peaked_long_row_no_overflow(dtype):
    # one key parallel to q, every other key anti-parallel: f ≈ e^-35 for all but one key, so the largest
    # x = N·A − 1 ≈ N − 1 = 1023 and x^15 ≈ 1e45 would overflow even float32; the max-normalised power cannot
    B, H, Lq, Lk, D = 1, 2, 4, 1024, 64
    q, k, v, do = make_inputs(B, H, Lq, Lk, D, torch.float32, seed=7)
    q = q[:, :, :1].expand_as(q).contiguous()
    k = -q[:, :, :1].expand(B, H, Lk, D).contiguous() + 0.01 * k
    k[:, :, 1000] = q[:, :, 0]
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    (o, *_), _ = check(q, k, v, do, "lssar", False, p=15.0)
    assert_close("o vs the peaked key's value", o, v[:, :, 1000:1001].expand_as(o), 1e-3)


def test_first_rows_ln_n_zero():
    # causal Lq = Lk: row 0 sees one key, c_0 = ln d·ln 1 = 0, so o_0 = v_0 and dq_0 = 0 exactly
    q, k, v, do = make_inputs(2, 2, 9, 9, 32, torch.float32, seed=9)
    for method in ("lssa", "lssar"):
        (o, dq, dk, dv), _ = check(q, k, v, do, method, True)
        assert_close("o_0 vs v_0", o[:, :, 0], v[:, :, 0], 1e-6)
        assert torch.equal(dq[:, :, 0], torch.zeros_like(dq[:, :, 0]))


@pytest.mark.parametrize("method", ["lssa", "lssar"])
def test_noncausal_more_queries_than_keys(method):
    # without a mask any Lq works (N_i = Lk for every row), also Lq > Lk
    check(*make_inputs(2, 2, 100, 17, 32, torch.float32, seed=12), method, False)


def test_strided_inputs():
    # non-contiguous inputs (a transposed [B, L, H, D] layout, as a model produces them)
    q, k, v, do = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_inputs(2, 3, 20, 20, 32,
                                                                                         torch.float32))
    assert not q.is_contiguous()
    check(q, k, v, do, "lssar", True)


def test_forward_without_grad_and_expanded_grad_output():
    # inference (no autograd graph) gives the same output up to float32 rounding (the forward that a backward
    # follows forms y^p as y^(p−1)·y, because it needs y^(p−1), inference as y^p directly: a few ulps of the
    # weights); a stride-0 dO (from o.sum().backward()) works
    q, k, v, _ = make_inputs(1, 2, 30, 30, 32, torch.float32, seed=4)
    with torch.no_grad():
        o_ng = freeatten_core.attention(q, k, v, method="lssar", backend="triton")
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    o = freeatten_core.attention(qs, ks, vs, method="lssar", backend="triton")
    assert_close("o without grad", o_ng, o.detach(), 2e-6)
    with torch.no_grad():
        o_lssa = freeatten_core.attention(q, k, v, method="lssa", backend="triton")
    assert torch.equal(o_lssa, freeatten_core.attention(qs, ks, vs, method="lssa", backend="triton").detach())
    o.sum().backward()
    ref = run_reference(q, k, v, torch.ones_like(o), "lssar", True)
    for name, x, r in zip(("dq", "dk", "dv"), (qs.grad, ks.grad, vs.grad), ref[1:]):
        assert_close(name, x.cpu(), r, TOL[torch.float32][1])


# --------------------------------------------------------------------------------------------------------
# Dispatch and clear errors
# --------------------------------------------------------------------------------------------------------


def test_unsupported_head_dim_is_a_clear_error():
    q, k, v, _ = make_inputs(1, 1, 8, 8, 48, torch.float32)
    assert "head dim 48" in tk.unsupported_reason(q, k, v, explicit=True)
    with pytest.raises(ValueError, match="head dim 48"):
        freeatten_core.attention(q, k, v, method="lssar", backend="triton")
    # auto falls back to the reference for it
    ref = reference.attention(q, k, v, "lssar", True)
    assert torch.equal(freeatten_core.attention(q, k, v, method="lssar", backend="auto"), ref)


def test_float64_is_a_clear_error():
    q, k, v, _ = make_inputs(1, 1, 8, 8, 32, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        freeatten_core.attention(q, k, v, method="lssa", backend="triton")


def test_auto_on_cpu_uses_the_reference():
    q, k, v, _ = make_inputs(1, 2, 8, 8, 32, torch.float32, device="cpu")
    assert "CUDA" in tk.unsupported_reason(q, k, v, explicit=False)
    out = freeatten_core.attention(q, k, v, method="lssar", backend="auto")
    assert torch.equal(out, reference.attention(q, k, v, "lssar", True))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    q, k, v, _ = make_inputs(1, 2, 8, 8, 32, torch.float32, device="cpu")
    monkeypatch.setattr(tk, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in tk.unsupported_reason(q, k, v, explicit=True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        freeatten_core.attention(q, k, v, method="lssa", backend="triton")


def test_poisoning_is_active():
    # the hook the tests rely on: buffers really start as NaN inside poison_outputs()
    assert torch.isnan(tk._new((3,), torch.float32, "cpu")).all()


# --------------------------------------------------------------------------------------------------------
# GPU section (collected only where CUDA runs the kernels natively): larger shapes in bfloat16 / float16
# --------------------------------------------------------------------------------------------------------
if ON_GPU:

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
    @pytest.mark.parametrize("method", ["lssa", "lssar"])
    @pytest.mark.parametrize("shape", [(2, 4, 1024, 1024, 64), (1, 4, 2048, 2048, 128), (2, 2, 500, 1500, 64),
                                       (1, 2, 4097, 4097, 128)], ids=lambda s: "B{}H{}q{}k{}d{}".format(*s))
    def test_gpu_half_precision(shape, method, causal, dtype):
        B, H, Lq, Lk, D = shape
        check(*make_inputs(B, H, Lq, Lk, D, dtype, seed=1), method, causal, tol=(1e-2, 1e-2))

    def test_gpu_auto_picks_the_kernels():
        q, k, v, _ = make_inputs(1, 2, 64, 64, 64, torch.bfloat16)
        assert tk.unsupported_reason(q, k, v, explicit=False) is None


# --------------------------------------------------------------------------------------------------------
# The log2-domain softplus, the policies (NaN, scale, p limit) and the softmax yardsticks
# --------------------------------------------------------------------------------------------------------


def _softplus2_on(t: torch.Tensor, deg: int) -> torch.Tensor:
    import triton
    import triton.language as tl

    @triton.jit
    def kern(x, o, n, DEG: tl.constexpr):
        offs = tl.program_id(0) * 1024 + tl.arange(0, 1024)
        f = tk._softplus2(tl.load(x + offs, mask=offs < n, other=0.0), DEG)
        tl.store(o + offs, f, mask=offs < n)

    out = torch.empty_like(t)
    kern[(triton.cdiv(t.numel(), 1024),)](t, out, t.numel(), DEG=deg)
    return out


@pytest.mark.parametrize("deg,bound", [(8, 4e-7), (4, 4e-4)])
def test_softplus_polynomial_accuracy(deg, bound):
    # log2(1 + 2^t) against float64 over the whole float32 range of scores (log-spaced magnitudes 1e-38..3e38,
    # both signs, and the range |t| <= 128 the kernels meet densely); relative error pinned (decisions page)
    mags = torch.logspace(-38, 38.5, 20000, dtype=torch.float64)
    dense = torch.linspace(-128, 128, 200001, dtype=torch.float64)
    t = torch.cat([mags, -mags, dense, torch.tensor([0.0, 3.4e38, -3.4e38], dtype=torch.float64)]).float()
    got = _softplus2_on(t.contiguous(), deg).double()
    td = t.double()
    exact = torch.logaddexp(td * math.log(2), torch.zeros_like(td)) / math.log(2)  # log2(1 + 2^t)
    assert torch.isfinite(got).all()
    keep = exact > 1e-30  # 2^t underflows float32 (ftz) below t = -126: f is then 0, and so is the weight
    rel = ((got - exact).abs() / exact)[keep]
    assert rel.max().item() < bound, rel.max().item()
    assert (got[~keep] <= 1e-30).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_yardstick_softmax_kernels(causal):
    from freeatten_core.attention import yardstick_kernels as yk

    for (B, H, Lq, Lk, D) in [(2, 2, 100, 100, 64), (1, 2, 17, 130, 32), (1, 1, 1, 1, 16)]:
        if not causal and Lq != Lk:
            Lq = 70
        q, k, v, do = make_inputs(B, H, Lq, Lk, D, torch.float32, seed=Lq)
        got = yk.softmax_attention(q, k, v, causal, do, tiles=(64, 64))
        ref = run_reference(q, k, v, do, "softmax", causal)
        for name, x, r in zip(("o", "dq", "dk", "dv", "dq (one pass)", "dk (one pass)", "dv (one pass)"), got,
                              ref + ref[1:]):
            assert_close(name, x, r, 1e-5 if name == "o" else 1e-4)


@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("where", ["v", "k"])
def test_nan_at_a_masked_key_poisons_only_rows_that_see_it(method, where):
    # causal, L = 70: a NaN / Inf in key 40 (v or k) must poison rows >= 40 only; rows < 40 (which do not see it,
    # and share the diagonal tile with it) keep their exact values, forward and backward
    q, k, v, do = make_inputs(1, 2, 70, 70, 32, torch.float32, seed=21)
    ref = run_kernel(q, k, v, do, method, True)
    for bad in (float("nan"), float("inf")):
        kk, vv = k.clone(), v.clone()
        (vv if where == "v" else kk)[0, 0, 40, 3] = bad
        o, dq, dk, dv = run_kernel(q, kk, vv, do, method, True)
        assert torch.equal(o[0, :, :40], ref[0][0, :, :40]) and torch.equal(o[0, 1], ref[0][0, 1])
        if where == "v":  # exactly the column of the bad element, NaN (never ±Inf) on every tile
            assert torch.isnan(o[0, 0, 40:, 3]).all()
            assert torch.isfinite(o[0, 0, 40:, :3]).all() and torch.isfinite(o[0, 0, 40:, 4:]).all()
        else:
            assert not torch.isfinite(o[0, 0, 40:]).any()
        for name, g, r in (("dq", dq, ref[1]), ("dk", dk, ref[2]), ("dv", dv, ref[3])):
            assert torch.equal(g[0, 1], r[0, 1]), name  # the other head: untouched
        assert torch.equal(dq[0, 0, :40], ref[1][0, 0, :40])  # rows that do not see key 40
        assert torch.isfinite(dk[0, 0, 41:]).sum() == 0 or where == "v"  # keys seen by poisoned rows


@pytest.mark.parametrize("method", ["lssa", "lssar"])
def test_nan_in_a_query_row_poisons_only_that_row(method):
    q, k, v, do = make_inputs(1, 1, 70, 70, 32, torch.float32, seed=22)
    ref = run_kernel(q, k, v, do, method, True)
    qq = q.clone()
    qq[0, 0, 30, 5] = float("nan")
    o, dq, dk, dv = run_kernel(qq, k, v, do, method, True)
    rows = torch.arange(70) != 30
    assert torch.isnan(o[0, 0, 30]).all() and torch.equal(o[0, 0, rows], ref[0][0, 0, rows])
    assert torch.isnan(dq[0, 0, 30]).all() and torch.equal(dq[0, 0, rows], ref[1][0, 0, rows])
    assert torch.equal(dk[0, 0, 31:], ref[2][0, 0, 31:])  # keys row 30 does not see
    assert torch.isnan(dk[0, 0, :31]).all()  # keys it sees depend on q_30


@pytest.mark.parametrize("method", ["lssa", "lssar"])
def test_nan_in_grad_output_reaches_only_what_depends_on_it(method):
    # a NaN / Inf cotangent dO_id: dq of row i, dk of the keys row i sees, dv_jd of those keys (column d only);
    # keys the row does not see (40 > 30) and the other columns keep the values of a clean dO
    q, k, v, do = make_inputs(1, 2, 70, 70, 32, torch.float32, seed=25)
    ref = run_kernel(q, k, v, do, method, True)
    for bad in (float("nan"), float("inf")):
        dd = do.clone()
        dd[0, 0, 30, 5] = bad
        o, dq, dk, dv = run_kernel(q, k, v, dd, method, True)
        assert torch.isnan(dq[0, 0, 30]).all() and torch.equal(dq[0, 0, 31:], ref[1][0, 0, 31:])
        assert torch.isnan(dk[0, 0, :31]).all() and torch.equal(dk[0, 0, 31:], ref[2][0, 0, 31:])
        assert torch.isnan(dv[0, 0, :31, 5]).all() and torch.equal(dv[0, 0, 31:], ref[3][0, 0, 31:])
        assert torch.isfinite(dv[0, 0, :, :5]).all() and torch.isfinite(dv[0, 0, :, 6:]).all()
        assert torch.equal(dv[0, 1], ref[3][0, 1]) and torch.equal(dq[0, 1], ref[1][0, 1])


@pytest.mark.parametrize("method", ["lssa", "lssar"])
@pytest.mark.parametrize("scale", [1e-30, 1e30, 3e38])
def test_scale_invariance(method, scale):
    # q, k scaled by 1e-30 .. 3e38: same output (the normalisation divides by the row's max |entry| first)
    q, k, v, do = make_inputs(1, 2, 40, 40, 32, torch.float32, seed=23)
    q, k = q / q.abs().amax(-1, keepdim=True), k / k.abs().amax(-1, keepdim=True)  # entries in [-1, 1]
    o1 = run_kernel(q, k, v, do, method, True)[0]
    o2 = run_kernel(q * scale, k * scale, v, do, method, True)[0]
    assert_close("o at scale", o2, o1, 1e-6)


def test_zero_vectors_map_to_zero():
    q, k, v, do = make_inputs(1, 1, 20, 20, 32, torch.float32, seed=24)
    q[0, 0, 5] = 0.0
    o, dq, dk, dv = run_kernel(q, k, v, do, "lssar", True)
    assert torch.isfinite(o).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    n = torch.arange(1, 21, dtype=torch.float64)
    assert_close("o_5 (uniform row)", o[0, 0, 5], (v.double().cumsum(2) / n[:, None])[0, 0, 5], 1e-5)


def test_p_above_p_max_is_a_clear_error():
    q, k, v, _ = make_inputs(1, 1, 8, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="P_MAX"):
        tk.attention(q, k, v, "lssar", True, p=tk.P_MAX * 1.5)
    tk.attention(q, k, v, "lssar", True, p=tk.P_MAX)  # the limit itself is accepted


@pytest.mark.parametrize("method", ["lssa", "lssar"])
def test_one_pass_and_deterministic_backward_agree(method, monkeypatch):
    # the default backward (one pass, dq through float32 atomics; LSSAR's row term from the forward's W and G)
    # and the two-kernel backward that torch.use_deterministic_algorithms(True) selects: both against float64,
    # and against each other
    q, k, v, do = make_inputs(2, 2, 77, 77, 32, torch.float32, seed=5)
    monkeypatch.delenv("FREEATTEN_DETERMINISTIC", raising=False)
    assert not tk.deterministic_backward()
    one, _ = check(q, k, v, do, method, True)
    torch.use_deterministic_algorithms(True)
    try:
        assert tk.deterministic_backward()
        two, _ = check(q, k, v, do, method, True)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(("o", "dq", "dk", "dv"), one, two):
        assert_close(name, a, b, 2e-5)
    monkeypatch.setenv("FREEATTEN_DETERMINISTIC", "1")
    assert tk.deterministic_backward()


def test_lssar_forward_keeps_w_only_for_a_backward():
    # W (for the one-pass backward's row term) is computed only when a gradient will be asked for
    q, k, v, _ = make_inputs(1, 1, 20, 20, 16, torch.float32)
    qh, kh = reference.unit(q), reference.unit(k)
    c2, tau = tk.Layout(q.shape, k.shape, None, True, q.device).row_constants()  # [B, Lq] each
    qs = (qh * c2[:, None, :, None]).contiguous()
    _, _, w = tk.lssa_fwd(qs, kh.contiguous(), v, tau, True, True, 15.0, 3, grad=False)
    assert w is None
    _, stats, w = tk.lssa_fwd(qs, kh.contiguous(), v, tau, True, True, 15.0, 3, grad=True)
    assert w is not None and w.shape == q.shape and torch.isfinite(w).all() and torch.isfinite(stats).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # y^p of a very negative y: -inf, then 0
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("p", [15.0, 3.0, 14.0], ids=lambda p: f"p{p:g}")
def test_lssar_inference_forward_with_gpu_operands(dtype, p):
    # the inference forward (no gradient) with the GPU's operand rounding: for odd p it applies the ReLU after
    # rounding y^p to the half-precision operand (packed), for even p before the power; both within the GPU
    # target of the float64 reference, and equal to the training forward (which forms y^(p-1)·y) up to rounding
    q, k, v, _ = make_inputs(1, 2, 257, 257, 64, dtype, seed=9)
    ref = reference.attention(q.double(), k.double(), v.double(), "lssar", True, p=p)
    with tk.emulate_gpu_dots():
        with torch.no_grad():
            o = freeatten_core.attention(q, k, v, method="lssar", causal=True, p=p, backend="triton")
        o_train = freeatten_core.attention(q, k, v.clone().requires_grad_(), method="lssar", causal=True, p=p,
                                           backend="triton").detach()
    assert_close("o (inference)", o, ref, 5e-3)
    assert_close("o (inference vs training)", o, o_train.double(), 5e-3)


# --------------------------------------------------------------------------------------------------------
# Grouped queries and sequence descriptors (padding, packed sequences)
# --------------------------------------------------------------------------------------------------------


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "two-kernel"])
@pytest.mark.parametrize("method", ["lssa", "lssar"])
def test_grouped_queries_equal_repeated_kv(method, deterministic):
    # K/V with H/G heads (never repeated in memory) give what the repeated K/V give: outputs, dq, and dk/dv as the
    # sums over each group's query heads
    g = torch.Generator().manual_seed(11)
    B, H, Hk, L, D = 2, 4, 2, 70, 32
    q, do = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    k, v = torch.randn(B, Hk, L, D, generator=g), torch.randn(B, Hk, L, D, generator=g)
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = _grads(lambda q, k, v: tk.attention(q, k, v, method, True), q, k, v, do)
        rep = _grads(lambda q, k, v: tk.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), method,
                                                  True), q, k, v, do)
    finally:
        torch.use_deterministic_algorithms(False)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, rep):
        assert_close(name, a, b, 1e-5)
    ref = run_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), do, method, True)
    assert_close("o vs float64", got[0], ref[0], TOL[torch.float32][0])


@pytest.mark.parametrize("method", ["lssa", "lssar"])
def test_sequence_descriptors_equal_separate_calls(method):
    # packed sequences (one batch row, three sequences of 30, 1 and 59 tokens) and a left-padded batch row: each
    # sequence's outputs and gradients equal the float64 reference on that sequence alone; rows in no sequence
    # output 0 and get zero gradients, even with NaN-poisoned kernel buffers
    g = torch.Generator().manual_seed(12)
    D = 32
    q, k, v, do = (torch.randn(2, 2, 90, D, generator=g) for _ in range(4))
    seqs = torch.tensor([[0, 0, 30, 0, 30], [0, 30, 31, 30, 31], [0, 31, 90, 31, 90], [1, 7, 90, 7, 90]],
                        dtype=torch.int32)
    with tk.poison_outputs():
        o, dq, dk, dv = _grads(lambda q, k, v: tk.attention(q, k, v, method, True, seqs=seqs), q, k, v, do)
    for b, a, e in ((0, 0, 30), (0, 30, 31), (0, 31, 90), (1, 7, 90)):
        ref = run_reference(q[b:b + 1, :, a:e], k[b:b + 1, :, a:e], v[b:b + 1, :, a:e], do[b:b + 1, :, a:e], method,
                            True)
        for name, x, r in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), ref):
            assert_close(f"{name} of sequence {b}:{a}-{e}", x[b:b + 1, :, a:e], r, TOL[torch.float32][name != "o"])
    for x in (o, dq, dk, dv):
        assert torch.equal(x[1, :, :7], torch.zeros_like(x[1, :, :7]))


def test_bad_sequence_descriptors_are_clear_errors():
    q, k, v, _ = make_inputs(2, 2, 10, 10, 16, torch.float32)
    bad = {
        "not a sequence": [[0, 0, 11, 0, 10]],  # past LQ
        "not a sequence ": [[2, 0, 5, 0, 5]],  # batch 2 of 2
        "no more query rows than key rows": [[0, 0, 6, 0, 5]],
        "share query rows": [[0, 0, 5, 0, 5], [0, 4, 8, 5, 9]],
        "share key rows": [[0, 0, 5, 0, 5], [0, 5, 8, 4, 8]],
        "int32/int64 tensor [S, 5]": [[0, 0, 5, 0]],
    }
    for words, rows in bad.items():
        with pytest.raises(ValueError, match=re.escape(words.strip())):
            tk.attention(q, k, v, "lssar", True, seqs=torch.tensor(rows))
    with pytest.raises(ValueError, match="H_kv dividing"):  # 3 key heads for 2 query heads
        tk.attention(q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), "lssa", True)


def test_every_launch_pins_the_compile_options(monkeypatch):
    # the instruction budgets assume multiply-add contraction, which Triton's default may change: every launch
    # passes COMPILE_OPTIONS (the interpreter ignores them, a GPU compile takes them)
    import ast
    import inspect

    from freeatten_core.attention import decode_kernels, yardstick_kernels

    seen = {}

    class Kernel:  # records what _launch passes
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.update(kw)

    monkeypatch.setenv("FREEATTEN_TILES", "64,64,4,2")  # a fixed configuration on a GPU too (no autotuner)
    tk._launch(Kernel(), "fwd", 10, 1, (), {"D": 16})
    assert seen.get("enable_fp_fusion") is True and seen["D"] == 16, seen
    launches = 0
    for mod in (tk, decode_kernels, yardstick_kernels):
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):  # kernel[grid](...)
                launches += 1
                assert any(kw.arg is None and "COMPILE_OPTIONS" in ast.unparse(kw.value) for kw in node.keywords), \
                    f"{mod.__name__}: a launch without **COMPILE_OPTIONS: {ast.unparse(node)[:120]}"
    assert launches >= 9, launches


def test_one_pass_backward_from_ampere_on(monkeypatch):
    # the kernel report compiles the one-pass backward for sm_80 without spills in its loops and with fewer
    # instructions per element than the two kernels together: Ampere and newer run it, older GPUs the two kernels
    import types

    cuda = types.SimpleNamespace(type="cuda")
    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.delenv("FREEATTEN_DETERMINISTIC", raising=False)
    for cap, expected in (((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert tk._one_pass(cuda) is expected, cap
    monkeypatch.setenv("FREEATTEN_DETERMINISTIC", "1")
    assert tk._one_pass(cuda) is False
