"""The GPT: shapes, RoPE beyond the training length, KV-cache decoding = full forward, every method trains."""

import pytest
import torch

import freeatten_core as fa
from freeatten_core.model import GPT, GPTConfig, Rotary


def tiny(method="softmax", **kw):
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, attention=method, **kw)
    torch.manual_seed(0)
    return GPT(cfg)


def test_forward_shapes_and_weight_tying():
    model = tiny()
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 64) and loss.ndim == 0
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any("pos" in n or "wpe" in n for n, _ in model.named_parameters())  # no learned positions
    _, per_token = model(idx, idx, reduction="none")
    assert per_token.shape == (3, 16)
    torch.testing.assert_close(per_token.mean(), loss)


def test_rope_is_a_relative_rotation_far_beyond_training_length():
    rot = Rotary(8)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    # <R(m)q, R(n)k> depends on m - n only: compare positions (3, 1) with (5003, 5001)
    a = (rot(q.float(), 3) * rot(k.float(), 1)).sum()
    b = (rot(q.float(), 5003) * rot(k.float(), 5001)).sum()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # norms are preserved and position 0 is the identity
    torch.testing.assert_close(rot(q.float(), 0), q.float())
    torch.testing.assert_close(rot(q.float(), 12345).norm(), q.float().norm())


def test_runs_at_16x_the_training_length():
    model = tiny("lssar").eval()
    logits, _ = model(torch.randint(0, 64, (1, 16 * 16)))
    assert logits.shape == (1, 256, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["softmax", "lssa", "lssar", "ssmax", "sigmoid", "linear", "relu_nol1"])
def test_kv_cache_matches_full_forward(method):
    model = tiny(method).double().eval()
    idx = torch.randint(0, 64, (2, 23))
    full, _ = model(idx)
    cache, parts = model.new_cache(), []
    for a, b in [(0, 5), (5, 6), (6, 14), (14, 15), (15, 23)]:  # a prompt, then single tokens and chunks
        parts.append(model(idx[:, a:b], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-10, rtol=1e-10)
    assert cache[0]["k"].shape == (2, 2, 23, 16)


def test_generate_with_and_without_cache_agree():
    model = tiny("lssar").double().eval()
    prompt = torch.randint(0, 64, (2, 5))
    a = model.generate(prompt, 12, temperature=0, use_cache=True)
    b = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert a.shape == (2, 17)
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    s = model.generate(prompt, 4, temperature=1.0, top_k=5, generator=g)
    assert s.shape == (2, 9) and torch.equal(s[:, :5], prompt)


@pytest.mark.parametrize("method", fa.METHODS)
def test_every_method_trains(method):
    """Every method gets gradients everywhere and a few AdamW steps lower the loss on a fixed batch."""
    model = tiny(method)
    opt = model.configure_optimizer(lr=1e-2, weight_decay=0.0)
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if not losses:
            for n, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), n
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_method_options_are_passed_through(monkeypatch):
    import freeatten_core.model as M

    seen = []
    real = M.attention_fn

    def spy(q, k, v, **kw):
        seen.append(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(M, "attention_fn", spy)
    model = tiny("lssar", attention_options={"p": 3.0, "offset_rows": 0}, backend="reference")
    model(torch.randint(0, 64, (1, 8)))
    assert seen and all(s["method"] == "lssar" and s["p"] == 3.0 and s["offset_rows"] == 0 and s["causal"] is True
                        and s["backend"] == "reference" for s in seen)
    seen.clear()
    model.set_attention("softmax")
    model(torch.randint(0, 64, (1, 8)))
    assert all(s["method"] == "softmax" and "p" not in s for s in seen)
    # p changes the output: the options really reach the method
    m15 = tiny("lssar", attention_options={"p": 15.0}).eval()
    m3 = tiny("lssar", attention_options={"p": 3.0}).eval()
    x = torch.randint(0, 64, (1, 12))
    assert not torch.allclose(m15(x)[0], m3(x)[0])


def test_ssmax_learns_s_per_head_unless_given():
    model = tiny("ssmax")
    s = model.transformer.h[0].attn.ssmax_s
    assert s is not None and s.shape == (2,)
    _, loss = model(torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9)))
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert tiny("ssmax", attention_options={"s": 2.0}).transformer.h[0].attn.ssmax_s is None


@pytest.mark.parametrize("bad, match", [
    (dict(attention="nope"), "unknown attention method 'nope'"),
    (dict(attention="lssar", attention_options={"q": 1}), "unknown option"),
    (dict(attention="lssar", attention_options={"p": 0.5}), "p must be"),
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(n_embd=12, n_head=4), "even"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(n_layer=0), "positive integer"),
])
def test_bad_config_is_refused(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GPTConfig(**bad)


def test_set_attention_checks_method():
    with pytest.raises(ValueError, match="unknown attention method"):
        tiny().set_attention("bogus")


def _fused_available():
    import os

    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        from freeatten_core.attention import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _fused_available(), reason="fused kernels need CUDA or TRITON_INTERPRET=1 (and triton)")
@pytest.mark.parametrize("method", ["lssa", "lssar"])
def test_fused_backend_trains_and_decodes_like_the_reference(method):
    """The model on backend="triton" (the GPU path; the interpreter on CPU): same loss, gradients, KV cache."""
    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 33))
    ref, fused = tiny(method, backend="reference"), tiny(method, backend="triton")
    (_, l_ref), (_, l_fused) = ref(x[:, :-1], x[:, 1:]), fused(x[:, :-1], x[:, 1:])
    l_ref.backward()
    l_fused.backward()
    torch.testing.assert_close(l_fused, l_ref, atol=1e-5, rtol=1e-5)
    for (n, a), b in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=n)
    fused.eval()
    with torch.no_grad():
        cache = fused.new_cache()
        inc = torch.cat([fused(x[:, :20], cache=cache)[0], fused(x[:, 20:25], cache=cache)[0]], 1)
        torch.testing.assert_close(inc, fused(x[:, :25])[0], atol=1e-5, rtol=1e-5)
