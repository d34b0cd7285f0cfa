"""The benchmark command: its CPU smoke mode (schema, provenance, plot), the FLOP convention, and that its
FlexAttention score_mods compute the same LSSA / LSSAR as the reference (forward; Flex has no CPU backward)."""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from freeatten_core import bench  # noqa: E402
from freeatten_core.attention import reference  # noqa: E402


def test_cpu_smoke_writes_json_and_plot(tmp_path):
    assert bench.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_cpu-smoke.json").read_text())
    assert data["schema_version"] == bench.SCHEMA_VERSION
    assert "not a speed measurement" in data["kind"]
    prov = data["provenance"]
    for key in ("device", "torch", "triton", "git_commit", "command", "date_utc"):
        assert prov[key], f"provenance field {key} is empty"
    assert prov["command"].startswith("python -m freeatten_core bench --cpu-smoke")
    assert "interpreter" in prov["device"].lower()
    cfg = data["config"]
    assert cfg["dtype"] == "bf16" and cfg["causal"] is True
    res = data["results"]
    seen = {(r["impl"], r["method"]) for r in res}
    assert seen == {("triton", "lssa"), ("triton", "lssar"), ("sdpa", "softmax"), ("flex", "lssa"),
                    ("flex", "lssar"), ("reference", "lssa"), ("reference", "lssar")}
    assert all(r["status"] == "ok" for r in res), [r["error"] for r in res if r["status"] != "ok"]
    for r in res:
        if r["timed"] and r["impl"] != "flex":
            assert set(r["ms"]) == set(bench.MODES)
        for mode, ms in r["ms"].items():
            assert ms > 0 and r["tflops"][mode] > 0
    # memory-only lengths are run, not timed
    assert {r["L"] for r in res if not r["timed"]} == set(cfg["mem_lengths"])
    assert any(r["impl"] == "triton" for r in data["ratios"])
    assert (tmp_path / "bench_cpu-smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_convention():
    fwd = bench.fa_flops(4, 16, 8192, 8192, 64, False, "fwd")
    assert fwd == 4 * 4 * 16 * 8192 * 8192 * 64
    assert bench.fa_flops(4, 16, 8192, 8192, 64, True, "fwd") == fwd / 2
    assert bench.fa_flops(4, 16, 8192, 8192, 64, False, "bwd") == 2.5 * fwd
    assert bench.fa_flops(4, 16, 8192, 8192, 64, False, "fwdbwd") == 3.5 * fwd


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager is the point here
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method", ["lssa", "lssar"])
def test_flex_score_mods_are_the_same_method(method, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 32, generator=g, dtype=torch.float64) for _ in range(3))
    fn = bench.flex_lssa_lssar(method, 40, 40, 32, causal, 15.0, 3, "cpu", compiled=False)
    with torch.no_grad():
        got = fn(q, k, v)
    ref = reference.attention(q, k, v, method, causal)
    assert (got - ref).abs().max().item() < 1e-10


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "1k"])
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--impls", "sdpa,cudnn"])
    if not torch.cuda.is_available():
        assert bench.main([]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_decode_cpu_smoke_writes_json_and_plot(tmp_path):
    assert bench.main(["--decode", "--cpu-smoke", "--queries", "3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode_cpu-smoke.json").read_text())
    assert "not a speed measurement" in data["kind"] and data["kind"].startswith("decode")
    assert data["provenance"]["command"].startswith("python -m freeatten_core bench --decode --cpu-smoke")
    cfg = data["config"]
    assert (cfg["heads"], cfg["kv_heads"], cfg["queries"]) == (bench.DECODE_SMOKE["heads"],
                                                                bench.DECODE_SMOKE["kv_heads"], 3)
    assert cfg["heads"] % cfg["kv_heads"] == 0 and cfg["heads"] > cfg["kv_heads"]  # grouped queries
    res = data["results"]
    assert {(r["impl"], r["method"]) for r in res} == {("triton", "lssa"), ("triton", "lssar"), ("sdpa", "softmax"),
                                                        ("reference", "lssa"), ("reference", "lssar")}
    assert all(r["status"] == "ok" for r in res), [r["error"] for r in res if r["status"] != "ok"]
    assert {r["Lk"] for r in res} == set(bench.DECODE_SMOKE["kv_lengths"])
    assert all(r["ms"] > 0 and r["kv_gb_per_s"] > 0 for r in res)
    assert {(r["impl"], r["Lk"]) for r in data["ratios"]} >= {("triton", L) for L in cfg["kv_lengths"]}
    assert (tmp_path / "decode_cpu-smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_step_runs_the_decoding_kernel(monkeypatch):
    from freeatten_core.attention import decode_kernels

    calls = []
    real = decode_kernels.decode
    monkeypatch.setattr(decode_kernels, "decode", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    q, k, v = (torch.randn(1, h, n, 16) for h, n in ((4, 1), (2, 20), (2, 20)))
    r = bench.measure_decode(bench.make_decode_impl("triton", "lssar", 15.0, 3), q, k, v, 0, 1, False)
    assert r["status"] == "ok" and calls


@pytest.mark.parametrize("argv,message", [
    (["--decode", "--kv-heads", "3", "--heads", "8"], "--kv-heads must divide --heads"),
    (["--decode", "--queries", "17"], "--queries must be at most 16"),
    (["--decode", "--impls", "flex"], "--decode times the implementations triton, sdpa, reference; not flex"),
    (["--decode", "--lengths", "64"], "--lengths does not apply with --decode"),
    (["--decode", "--queries", "8", "--kv-lengths", "4,64"], "every --kv-lengths value must be >= --queries"),
    (["--kv-heads", "2"], "--kv-heads only apply with --decode"),
    (["--kv-lengths", "64"], "--kv-lengths only apply with --decode"),
])
def test_decode_bad_arguments_are_clear_errors(tmp_path, capsys, argv, message):
    assert bench.main([*argv, "--cpu-smoke", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # checked before any work


def test_decode_argument_parsing(capsys):
    for bad in (["--decode", "--queries", "0"], ["--decode", "--kv-lengths", "1k"], ["--decode", "--kv-heads", "x"]):
        with pytest.raises(SystemExit):
            bench.main(bad)
        assert "error" in capsys.readouterr().err
