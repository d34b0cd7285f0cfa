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
