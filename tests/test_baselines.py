"""The baselines beside the paper's methods: QK-norm softmax, sliding-window softmax, NTK-aware and YaRN RoPE
scaling at inference, streaming with a bounded KV cache (with and without attention sinks), and the p sweep
(re-weighting at training against re-weighting only at inference)."""

import math

import numpy as np
import pytest
import torch

import freeatten_core as fa
from freeatten_core import evaluate as E
from freeatten_core import experiments as X
from freeatten_core import tasks as TK
from freeatten_core.data import ByteTokenizer, TokenData
from freeatten_core.model import GPT, GPTConfig, Rotary, rope_frequencies

TOK = ByteTokenizer()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------
# QK-norm
# ------------------------------------------------------------------------------------------------------------

def test_qknorm_is_softmax_of_scaled_cosines():
    q, k = rand(1, 2, 5, 8, seed=1) * 3, rand(1, 2, 7, 8, seed=2)
    s = torch.tensor([2.0, 7.0], dtype=torch.float64)
    w = fa.attention_weights(q, k, "softmax_qknorm", causal=True, s=s)
    for h in range(2):
        for i in range(5):
            n = i + 7 - 5 + 1  # bottom-right: row i sees the first N_i keys
            cos = [float(q[0, h, i] @ k[0, h, j] / (q[0, h, i].norm() * k[0, h, j].norm())) for j in range(n)]
            e = np.exp(float(s[h]) * np.array(cos))
            np.testing.assert_allclose(w[0, h, i, :n].numpy(), e / e.sum(), rtol=1e-12)
            assert (w[0, h, i, n:] == 0).all()
    # the scale is invariant to the size of q and k (that is the point of the normalisation)
    torch.testing.assert_close(fa.attention_weights(q * 100, k, "softmax_qknorm", causal=True, s=s), w)


def test_qknorm_model_learns_one_scale_per_head_unless_given():
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16, attention="softmax_qknorm")
    model = GPT(cfg)
    g = model.transformer.h[0].attn.qk_scale
    assert g.shape == (2,) and torch.allclose(g, torch.full((2,), math.log2(16 * 16 - 16)))
    idx = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    assert g.grad is not None and (g.grad != 0).all()
    fixed = GPT(GPTConfig(**{**cfg.to_dict(), "attention_options": {"s": 5.0}}))
    assert fixed.transformer.h[0].attn.qk_scale is None
    assert "qk_scale" not in "".join(n for n, _ in GPT(GPTConfig(vocab_size=32, n_head=2, n_embd=16)).named_parameters())


# ------------------------------------------------------------------------------------------------------------
# Sliding-window softmax
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Lq,Lk,causal", [(6, 6, True), (3, 9, True), (4, 5, False)])
@pytest.mark.parametrize("window", [1, 3, 20])
def test_sliding_window_against_a_dense_computation(Lq, Lk, causal, window):
    q, k, v = rand(1, 2, Lq, 8, seed=3), rand(1, 2, Lk, 8, seed=4), rand(1, 2, Lk, 8, seed=5)
    w = fa.attention_weights(q, k, "softmax_window", causal=causal, window=window)
    o = fa.attention(q, k, v, method="softmax_window", causal=causal, backend="reference", window=window)
    for h in range(2):
        for i in range(Lq):
            last = i + Lk - Lq if causal else Lk - 1  # the newest key the row sees (bottom-right alignment)
            keys = list(range(max(0, last - window + 1), last + 1))
            s = np.array([float(q[0, h, i] @ k[0, h, j]) / math.sqrt(8) for j in keys])
            p = np.exp(s - s.max())
            p /= p.sum()
            dense = np.zeros(Lk)
            dense[keys] = p
            np.testing.assert_allclose(w[0, h, i].numpy(), dense, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(o[0, h, i].numpy(), p @ v[0, h, keys].numpy(), rtol=1e-12, atol=1e-14)
            assert int((w[0, h, i] > 0).sum()) == min(last + 1, window)  # N_i = min(N_i of the rule, W)
    if window >= Lk:  # a window that covers every key is plain softmax
        torch.testing.assert_close(w, fa.attention_weights(q, k, "softmax", causal=causal), rtol=0, atol=0)


def test_bad_window_names_the_problem():
    q = rand(1, 1, 4, 8)
    with pytest.raises(ValueError, match="option window must be >= 1"):
        fa.attention_weights(q, q, "softmax_window", causal=True, window=0)
    with pytest.raises(TypeError, match="option window must be an integer"):
        fa.attention_weights(q, q, "softmax_window", causal=True, window=2.5)
    with pytest.raises(ValueError, match="unknown option"):
        fa.attention_weights(q, q, "softmax", causal=True, window=4)


def test_the_method_table_lists_the_baselines():
    table = fa.method_table()
    for name in ("softmax_qknorm", "softmax_window", "ssmax"):
        assert f"`{name}`" in table
    assert "`window=256`" in table and fa.REGISTRY["softmax_window"].family == "baseline"


# ------------------------------------------------------------------------------------------------------------
# RoPE scaling at inference
# ------------------------------------------------------------------------------------------------------------

def test_rope_scaling_at_factor_1_is_the_identity():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.randint(0, 40, (1, 50))
    plain = model(idx)[0]
    for kind in ("none", "ntk", "yarn"):
        theta, m = rope_frequencies(16, 10000.0, kind, 1.0, 8)
        assert torch.equal(theta, rope_frequencies(16, 10000.0)[0]) and m == 1.0
        model.set_rope_scaling(kind, 1)
        assert torch.equal(model(idx)[0], plain), kind
    model.set_rope_scaling("yarn", 4)
    assert model.rope_scaling == ("yarn", 4.0) and not torch.equal(model(idx)[0], plain)
    model.set_rope_scaling("none")
    assert torch.equal(model(idx)[0], plain)


def definition(kind, D, base, s, L):
    """The published formulas, written out per dimension: NTK-aware base b·s^(D/(D−2)); YaRN's
    h(θ) = (1 − γ(r))·θ/s + γ(r)·θ with r = L/λ, λ = 2π/θ, γ the ramp from α = 1 to β = 32, and the q/k
    multiplier 0.1·ln s + 1."""
    if kind == "ntk":
        return [(base * s ** (D / (D - 2))) ** (-2 * i / D) for i in range(D // 2)], 1.0
    out = []
    for i in range(D // 2):
        theta = base ** (-2 * i / D)
        r = L / (2 * math.pi / theta)
        gamma = 0.0 if r < 1 else 1.0 if r > 32 else (r - 1) / 31
        out.append((1 - gamma) * theta / s + gamma * theta)
    return out, 0.1 * math.log(s) + 1


@pytest.mark.parametrize("kind", ["ntk", "yarn"])
def test_rope_rotation_under_scaling_matches_the_definition(kind):
    D, base, s, L = 64, 10000.0, 4.0, 256
    theta, m = definition(kind, D, base, s, L)
    got, got_m = rope_frequencies(D, base, kind, s, L)
    np.testing.assert_allclose(got.numpy(), theta, rtol=1e-13)
    assert math.isclose(got_m, m, rel_tol=1e-15)
    rot = Rotary(D, base)
    rot.set_scaling(kind, s, L)
    x = rand(1, 1, 5, D).float()
    offset = 100  # θ is stored in float32: its rounding moves the angle by about position x 6e-8
    y = rot(x, offset)
    for t in range(5):
        for i in range(D // 2):  # rotate-half: channel i pairs with i + D/2
            a = (offset + t) * theta[i]
            c, sn = math.cos(a), math.sin(a)
            x1, x2 = float(x[0, 0, t, i]), float(x[0, 0, t, i + D // 2])
            assert math.isclose(float(y[0, 0, t, i]), m * (x1 * c - x2 * sn), abs_tol=2e-5)
            assert math.isclose(float(y[0, 0, t, i + D // 2]), m * (x1 * sn + x2 * c), abs_tol=2e-5)
    if kind == "yarn":  # the fastest dimension is kept, the slowest interpolated by s
        plain = rope_frequencies(D, base)[0]
        assert got[0] == plain[0] and math.isclose(got[-1], plain[-1] / s, rel_tol=1e-14)


def test_bad_rope_scaling_names_the_problem(tmp_path, capsys):
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="unknown RoPE scaling kind 'linear'; valid kinds: none, ntk, yarn"):
        model.set_rope_scaling("linear", 2)
    with pytest.raises(ValueError, match="factor must be a finite number >= 1"):
        model.set_rope_scaling("ntk", 0.5)
    with pytest.raises(ValueError, match="rope_scaling must be"):
        E.check_rope_scaling("yarn")
    with pytest.raises(ValueError, match="unknown RoPE scaling kind"):
        X.get_variants([X.Variant("x", "softmax", rope_scaling=("pi", 2))])
    assert E.main(["--checkpoint", str(tmp_path), "--rope-scaling", "bogus"]) == 2
    assert "unknown RoPE scaling kind 'bogus'" in capsys.readouterr().err
    assert E.main(["--checkpoint", str(tmp_path), "--rope-scaling", "ntk", "--rope-factor", "x"]) == 2
    assert "--rope-factor must be" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# Streaming with a bounded KV cache
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)).double().eval()


def full_losses(model, tokens):
    logits = model(tokens[:, :-1])[0]  # float64: the model is in double precision
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def test_streaming_with_a_window_that_holds_the_text_is_full_attention(small):
    tokens = torch.randint(0, 64, (3, 41), generator=torch.Generator().manual_seed(1))
    full = full_losses(small, tokens)
    for sinks in (0, 4):
        got = TK.stream_losses(small, tokens, window=40, sinks=sinks, batch_size=2)
        torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)


def test_sinks_change_the_result_once_the_window_slides(small):
    tokens = torch.randint(0, 64, (2, 41), generator=torch.Generator().manual_seed(2))
    full = full_losses(small, tokens)
    none, sinks = (TK.stream_losses(small, tokens, window=8, sinks=s) for s in (0, 3))
    for x in (none, sinks):  # until the window is full it is the full forward
        torch.testing.assert_close(x[:, :8], full[:, :8], rtol=1e-12, atol=1e-12)
    assert (none[:, 9:] - sinks[:, 9:]).abs().max() > 1e-6
    assert (none[:, 9:] - full[:, 9:]).abs().max() > 1e-6
    cache = small.new_cache(window=8, sinks=3)
    small(tokens[:, :8], cache=cache)
    for t in range(8, 20):
        small(tokens[:, t:t + 1], cache=cache)
        assert cache[0]["k"].shape[2] == 8


def test_streaming_task_on_the_corpus_and_its_errors(small):
    data = TokenData(train=np.zeros(0, np.int64), val=[np.arange(500) % 64], vocab_size=64, tokenizer="x",
                     corpus="x")
    task = TK.get_task("streaming")
    ex = task.make_examples(None, 32, 2, 0, data=data, block_size=8)
    res = task.score(small, ex)
    assert res["window"] == 8 and res["sinks"] == 4 and len(res["loss_by_position"]) == 32
    loss = TK.get_task("loss").score(small, TK.get_task("loss").make_examples(None, 32, 2, 0, data=data,
                                                                               block_size=8))
    assert not math.isclose(res["loss_last"], loss["loss_last"])  # the window slid
    wide = TK.StreamingTask("wide", window=64, sinks=0)
    wide = wide.score(small, wide.make_examples(None, 32, 2, 0, data=data, block_size=8))
    assert math.isclose(wide["loss_window"], loss["loss_window"], rel_tol=1e-6)  # the loss task: float32 loss
    with pytest.raises(ValueError, match="multiple of the training length L = 8"):
        task.make_examples(None, 30, 2, 0, data=data, block_size=8)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        TK.StreamingTask("x", window=0)
    with pytest.raises(ValueError, match="sinks \\(4\\) must be fewer than the window \\(4\\)"):
        TK.StreamingTask("x", window=4, sinks=4)
    with pytest.raises(ValueError, match="sinks \\(4\\) must be fewer than the window \\(2\\)"):
        task.make_examples(None, 4, 1, 0, data=data, block_size=2)
    with pytest.raises(ValueError, match="KV window must be an integer >= 1"):
        small.new_cache(window=0)
    with pytest.raises(ValueError, match="sinks \\(2\\) need a window"):
        small.new_cache(sinks=2)
    cache = small.new_cache(window=4)
    small(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="one token per step"):
        small(torch.zeros(1, 2, dtype=torch.long), cache=cache)


# ------------------------------------------------------------------------------------------------------------
# The p sweep, and the runner with the new variants
# ------------------------------------------------------------------------------------------------------------

def test_p_sweep_variants_and_bad_powers():
    vs = X.p_sweep_variants((1, 15, 31))
    assert [v.name for v in vs] == ["lssar p=1", "lssa+reweight@eval p=1", "lssar", "lssa+reweight@eval",
                                    "lssar p=31", "lssa+reweight@eval p=31"]
    assert vs[4].options == {"p": 31.0} and vs[5].method == "lssa" and vs[5].eval_options == {"p": 31.0}
    assert len({v.run_name for v in vs if v.eval_method}) == 1  # one LSSA training run serves every p
    with pytest.raises(ValueError, match="option p must be a finite number >= 1"):
        X.check_ps([0.5])
    with pytest.raises(ValueError, match="must not repeat"):
        X.check_ps([3, 3])
    assert X.main(["psweep", "--ps", "1,abc", "--out", "x.json"]) == 2


def test_p_sweep_and_rope_variants_run_and_report(tmp_path):
    ov = dict(model=dict(block_size=16, n_layer=1, n_head=2, n_embd=32), max_steps=2, warmup_steps=1,
              batch_size=2, ckpt_interval=2)
    res = X.run_p_sweep("ci", (3,), [0], out_dir=tmp_path / "p", overrides=ov, evaluation=dict(factors=[1, 2],
                        windows=1))
    rows = X.p_sweep_table(res)
    assert [r["p"] for r in rows] == [3.0] and set(rows[0]["trained"]) == {1, 2} and "inference" in rows[0]
    runs = {r["variant"]: r for r in res["runs"]}
    assert runs["lssa+reweight@eval p=3"]["evaluated"]["options"]["p"] == 3.0
    assert runs["lssar p=3"]["trained"]["options"]["p"] == 3.0
    res = X.run_tasks("ci", ["softmax", "softmax+yarn@eval"], [0], ["loss", "streaming_nosink"],
                      out_dir=tmp_path / "r", overrides=ov, evaluation=dict(factors=[1, 2], windows=1))
    yarn = [r for r in res["runs"] if r["variant"] == "softmax+yarn@eval"][0]
    assert yarn["tasks"]["loss"]["2"]["rope_scaling"] == ["yarn", 2.0] and yarn["evaluated"]["rope_scaling"] == [
        "yarn", "length"]
    plain = [r for r in res["runs"] if r["variant"] == "softmax"][0]
    assert plain["tasks"]["loss"]["1"]["loss_window"] == yarn["tasks"]["loss"]["1"]["loss_window"]  # factor 1
    assert plain["tasks"]["loss"]["2"]["loss_window"] != yarn["tasks"]["loss"]["2"]["loss_window"]
    assert X.task_claims(res) == []  # loss and streaming have no accuracy to judge
