"""LSSA/LSSAR inside Hugging Face transformers models (tiny, randomly initialised from configs: nothing downloaded)."""

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import freeatten_core as fa  # noqa: E402
from freeatten_core.integrations import transformers as fa_hf  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM  # noqa: E402

fa_hf.register()

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, intermediate_size=128,
             max_position_embeddings=64)
ARCHS = {  # Llama with grouped-query attention (2 key/value heads), Qwen2 with one (multi-query), GPT-NeoX
    "llama": lambda **kw: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, **kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**SMALL, num_key_value_heads=1, **kw),
    "gpt_neox": lambda **kw: transformers.GPTNeoXConfig(**SMALL, **kw),
}


def model(arch, impl="lssar", seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(ARCHS[arch](**kw), attn_implementation=impl).eval()


def ids(B, L, seed=1):
    return torch.randint(3, 128, (B, L), generator=torch.Generator().manual_seed(seed))


def _heads(module):
    return module.config.num_attention_heads // getattr(module.config, "num_key_value_heads",
                                                         module.config.num_attention_heads)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_layer_is_the_package_attention(arch, monkeypatch):
    """Each layer's output equals freeatten_core.attention on the q/k/v the layer passed (k/v repeated per query
    head here), and the logits equal a model whose attention is that plain reference call."""
    seen = []
    lssar = AttentionInterface._global_mapping["lssar"]

    def spy(module, q, k, v, mask, **kw):
        out = lssar(module, q, k, v, mask, **kw)
        seen.append((q, k, v, _heads(module), out[0]))
        return out

    def plain(module, q, k, v, mask, **kw):
        r = _heads(module)
        o = fa.attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), "lssar", True, "reference")
        return o.transpose(1, 2), None

    monkeypatch.setitem(AttentionInterface._global_mapping, "lssar_spy", spy)
    monkeypatch.setitem(AttentionInterface._global_mapping, "lssar_plain", plain)
    x = ids(2, 11)
    with torch.no_grad():
        got = model(arch, "lssar_spy")(x).logits
        want = model(arch, "lssar_plain")(x).logits
        sdpa = model(arch, "sdpa")(x).logits
    assert len(seen) == 2
    for q, k, v, r, out in seen:
        assert k.shape[1] * r == q.shape[1]
        ref = fa.attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), "lssar", True, "reference")
        torch.testing.assert_close(out, ref.transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - sdpa).abs().max() > 1e-2  # the switch changed the attention


@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_gives_finite_gradients(arch):
    m = model(arch).train()
    x = ids(2, 12)
    loss = m(x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    q_proj = [p.grad for n, p in m.named_parameters() if "q_proj" in n or "query_key_value" in n]
    assert q_proj and all(g.abs().sum() > 0 for g in q_proj)


def _generate(m, x, mask=None, **kw):
    return m.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_uncached(arch):
    """Greedy decoding with a KV cache (queries aligned to the last keys) gives the tokens of decoding without
    one; the last step's logits agree to 1e-5 (float32 rounding; measured about 3e-7)."""
    m = model(arch)
    x = ids(2, 9)
    a, b = _generate(m, x, use_cache=True), _generate(m, x, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logits[-1], b.logits[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_gives_the_logits_of_the_prompt_alone(arch):
    """A prompt left-padded in a batch: the same logits at its real positions (N_i counts real keys only) and the
    same greedy continuation, with the cache, as the prompt alone."""
    m = model(arch)
    long, short = ids(1, 10, seed=2), ids(1, 6, seed=3)
    pad = 10 - 6
    x = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones_like(x)
    mask[1, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = m(x, attention_mask=mask, position_ids=pos).logits
        alone = m(short).logits
        first = m(long).logits
    torch.testing.assert_close(batch[1, pad:], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[0], first[0], rtol=0, atol=1e-5)
    gen = _generate(m, x, mask)
    assert torch.equal(gen.sequences[1, pad:], _generate(m, short).sequences[0])
    assert torch.equal(gen.sequences[0], _generate(m, long).sequences[0])


def test_static_cache_equals_dynamic_cache():
    """A static cache hands over all its slots (unused ones masked): they are dropped, the result is the same."""
    m = model("llama")
    x = ids(2, 7)
    a, b = _generate(m, x), _generate(m, x, cache_implementation="static")
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logits[-1], b.logits[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_packed_sequences_equal_separate_sequences(arch):
    """Sequences packed into one row (position_ids restarting at 0, as DataCollatorWithFlattening makes them)
    give the logits of each sequence alone: the mask becomes cu_seqlens."""
    m = model(arch)
    a, b = ids(1, 5, seed=4), ids(1, 7, seed=5)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = m(torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits
        alone = torch.cat([m(a).logits, m(b).logits], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_compiled_model_has_no_graph_breaks_and_equals_eager():
    """Under torch.compile the attention (mask decoding included) is one operator: no graph break, and a padded
    batch's loss and gradients equal eager (backend aot_eager)."""
    torch._dynamo.reset()
    m = model("llama").train()
    x = ids(2, 10, seed=6)
    mask = torch.ones_like(x)
    mask[1, :3] = 0

    def loss(x, mask):
        return m(x, attention_mask=mask, labels=x, use_cache=False).loss

    results = []
    for f in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):  # fullgraph: a break would raise
        m.zero_grad()
        value = f(x, mask)
        value.backward()
        results.append([value.detach()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_lssa_and_options_register():
    names = fa_hf.register(methods=("lssa", "lssar"), p=8.0)
    try:
        assert names == ("lssa", "lssar")
        x = ids(1, 8)
        with torch.no_grad():
            p8 = model("llama")(x).logits
            lssa = model("llama", "lssa")(x).logits
        fa_hf.register()
        with torch.no_grad():
            p15 = model("llama")(x).logits
        assert (p8 - p15).abs().max() > 1e-4 and (lssa - p15).abs().max() > 1e-4
    finally:
        fa_hf.register()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown attention method"):
        fa_hf.register(methods=("lssr",))
    with pytest.raises(ValueError, match="taken by none"):
        fa_hf.register(methods=("lssa",), p=3.0)
    with pytest.raises(ValueError, match="option p"):
        fa_hf.register(p=0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        fa_hf.register(backend="cuda")
    x = ids(1, 8)
    m = model("llama", attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="attention dropout"):
        m(x)
    m = model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding_window"):
        m(x)
    # a mask that is neither causal + padding nor packed sequences: a sliding window of 2 keys
    band = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril() & ~torch.ones(1, 1, 5, 5, dtype=torch.bool).tril(-2)
    with pytest.raises(ValueError, match="cannot be expressed"):
        fa_hf.mask_to_batching(band, 1, 5, 5, True)
    with pytest.raises(ValueError, match="biases"):
        fa_hf.mask_to_batching(torch.full((1, 1, 2, 2), -0.5), 1, 2, 2, True)


def test_import_without_transformers_names_the_extra():
    """The core package never imports transformers; the adapter without it says which extra to install."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import freeatten_core, freeatten_core.model\n"
            "try:\n    import freeatten_core.integrations.transformers\n"
            "except ImportError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "pip install 'freeatten-core[hf]'" in run.stdout, run.stderr
