"""torch.compile: LSSA/LSSAR as the custom operator freeatten::lssa_attention (no graph breaks, eager numbers).

Compiled with backend "aot_eager" (AOTAutograd's forward/backward graphs run eagerly): it exercises the fake
implementation and the autograd registration, and takes a second; inductor works on this CPU too but spends its
time generating C++.
"""

import pytest
import torch

import freeatten_core as fa
from freeatten_core import model as gpt
from freeatten_core.attention import ops


def inputs(H=4, Hkv=2, L=11, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, L, D, generator=g)
    k, v = torch.randn(2, 2, Hkv, L, D, generator=g).unbind(0)
    kpm = torch.ones(2, L, dtype=torch.bool)
    kpm[1, :3] = False
    return q, k, v, kpm


def layer(method, backend="reference", **opts):
    def fn(q, k, v, kpm):
        return ops.attention(torch.tanh(q), k, v, method, True, backend, key_padding_mask=kpm, **opts) * 2
    return fn


def test_no_graph_breaks_where_the_api_breaks():
    q, k, v, kpm = inputs()
    assert torch._dynamo.explain(layer("lssar", p=9.0))(q, k, v, kpm).graph_break_count == 0

    def direct(q, k, v, kpm):  # the API itself reads tensor values (NaN policy, mask checks): dynamo breaks there
        return fa.attention(torch.tanh(q), k, v, "lssar", True, "reference", key_padding_mask=kpm) * 2

    assert torch._dynamo.explain(direct)(q, k, v, kpm).graph_break_count > 0


@pytest.mark.parametrize("method,opts", [("lssa", {}), ("lssar", dict(p=9.0, offset_rows=2))])
def test_compiled_forward_backward_equal_eager(method, opts):
    torch._dynamo.reset()
    q, k, v, kpm = inputs(seed=1)
    fn = layer(method, **opts)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*x, kpm)
        results.append((out, *torch.autograd.grad(out.square().sum(), x)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert results[1][1].abs().sum() > 0


def test_operator_checks():
    """PyTorch's own checks of a custom operator: schema, fake implementation, autograd registration."""
    q, k, v, kpm = inputs(L=5)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kpm, None, "lssar", True, "reference",
            15.0, 3)
    torch.library.opcheck(torch.ops.freeatten.lssa_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_gpt_compiles_without_graph_breaks():
    cfg = gpt.GPTConfig(vocab_size=32, n_layer=2, n_head=2, n_embd=32, block_size=8, attention="lssar",
                        backend="reference")
    torch.manual_seed(0)
    m = gpt.GPT(cfg)
    x = torch.randint(0, 32, (2, 8))
    assert torch._dynamo.explain(lambda x: m(x, x)[1])(x).graph_break_count == 0


def test_errors_at_trace_time():
    q, k, v, kpm = inputs()
    with pytest.raises(ValueError, match="unknown attention method"):
        torch.compile(lambda q: ops.attention(q, k, v, "lssr"), backend="aot_eager")(q)
    with pytest.raises(ValueError, match="option p"):
        torch.compile(lambda q: ops.attention(q, k, v, "lssar", p=0.1), backend="aot_eager")(q)
