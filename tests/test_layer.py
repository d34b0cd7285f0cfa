"""fa.AttentionLayer: projections + RoPE around freeatten_core.attention."""

import pytest
import torch

import freeatten_core as fa
from freeatten_core.model import Rotary


def x_(B=2, L=9, E=32, seed=0):
    return torch.randn(B, L, E, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_equals_the_functional_api_on_its_projections(kv):
    torch.manual_seed(0)
    layer = fa.AttentionLayer(32, 4, num_kv_heads=kv, bias=True, rope=10000.0, p=9.0)
    x = x_()
    B, L, _ = x.shape
    Hkv = kv or 4
    q = Rotary(8, 10000.0)(layer.q_proj(x).view(B, L, 4, 8).transpose(1, 2))
    k = Rotary(8, 10000.0)(layer.k_proj(x).view(B, L, Hkv, 8).transpose(1, 2))
    v = layer.v_proj(x).view(B, L, Hkv, 8).transpose(1, 2)
    g = 4 // Hkv
    o = fa.attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), "lssar", True, "reference", p=9.0)
    want = layer.out_proj(o.transpose(1, 2).reshape(B, L, 32))
    y = layer(x)
    assert y.shape == (2, 9, 32)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_padding_and_packing():
    """Left padding: the real rows equal the unpadded sequence (RoPE is relative); packed sequences equal
    separate calls (RoPE positions restart per sequence)."""
    torch.manual_seed(1)
    layer = fa.AttentionLayer(32, 4, num_kv_heads=2, rope=10000.0, method="lssa")
    a, b = x_(1, 5, seed=2), x_(1, 7, seed=3)
    padded = torch.cat([torch.zeros(1, 2, 32), a], 1)
    kpm = torch.tensor([[False, False] + [True] * 5])
    y = layer(padded, key_padding_mask=kpm)
    torch.testing.assert_close(y[:, 2:], layer(a), rtol=0, atol=1e-5)
    assert torch.equal(y[:, :2], torch.zeros(1, 2, 32))  # padding positions output 0 (no bias here)
    packed = layer(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 5, 12]))
    torch.testing.assert_close(packed, torch.cat([layer(a), layer(b)], 1), rtol=0, atol=1e-5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        fa.AttentionLayer(30, 4)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"):
        fa.AttentionLayer(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown attention method 'lssr'; valid methods"):
        fa.AttentionLayer(32, 4, method="lssr")
    with pytest.raises(ValueError, match="option p"):
        fa.AttentionLayer(32, 4, p=0.0)
    with pytest.raises(ValueError, match="unknown backend"):
        fa.AttentionLayer(32, 4, backend="gpu")
    with pytest.raises(ValueError, match="rope must be None or the RoPE base"):
        fa.AttentionLayer(32, 4, rope=True)
    with pytest.raises(ValueError, match="even head dim"):
        fa.AttentionLayer(36, 4, rope=10000.0)
    with pytest.raises(ValueError, match="dropout"):
        fa.AttentionLayer(32, 4, dropout=1.0)
    layer = fa.AttentionLayer(32, 4, rope=10000.0)
    with pytest.raises(ValueError, match="batch first"):
        layer(torch.zeros(9, 32))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        layer(torch.zeros(1, 6, 32), cu_seqlens=torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        layer(torch.zeros(2, 6, 32), key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    assert "method='lssar'" in repr(layer)
