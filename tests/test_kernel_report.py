"""The kernel report as a performance regression check that needs no GPU: the fused kernels are compiled for
Hopper (sm_90a) with Triton's own compiler and ptxas, and their inner loops are counted in SASS.

Only the main configuration (head dim 64, bfloat16, causal, the kernels' TILES) is compiled here (about 20–40 s
on 2 cores without a warm Triton cache); ``python -m freeatten_core kernel-report`` does sm_80, other head dims
and dtypes. Fails when a kernel loop with an enforced target (``kernel_report.ENFORCED``: the speed budgets
that the kernels meet) needs more instructions per attention element than the budget allows relative to the
softmax yardstick, when any other loop (and any yardstick loop) grows past its ceiling (``kernel_report.CEILINGS``,
+3 %), or when a kernel spills or loses warpgroup MMA (HGMMA).
"""

import copy

from freeatten_core import kernel_report as kr

SASS_LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R5 ;
        /*0020*/                   MUFU.EX2 R6, R2 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/              @!P0 BRA 0x10 ;
        /*0050*/                   EXIT ;
"""


def test_sass_analysis_counts_a_loop():
    # a hand-written listing: the loop is [0x10, 0x40], 4 instructions, 2 elements per thread
    out = kr.analyse_sass(SASS_LOOP, 2.0, ["main"])
    loop = out["loops"]["main"]
    assert loop["instructions"] == 4 and loop["per_element"] == 2.0
    assert loop["mufu_per_element"] == {"EX2": 0.5} and loop["hgmma"] == 1
    assert out["spill_instructions"] == 0 and out["loop_structure_ok"]
    assert kr.element_math(loop) == 1.0  # FFMA and MUFU are element math; the HGMMA and the branch are not


def _report():
    return kr.build_report(archs=(90,), head_dims=(64,), dtypes=("bfloat16",), causal=True, processes=2)


def test_every_loop_is_checked():
    # each loop of the speed budgets is either an enforced target or held by a ceiling, never neither
    for kernel, (_, loops) in kr.BUDGETS.items():
        for loop in loops:
            assert kr.enforced(kernel, loop) or loop in kr.CEILINGS.get(kernel, {}), (kernel, loop)


def test_main_configuration():
    # one test, so that the kernels are compiled once per run (pytest -n 2 would compile them in each worker
    # for a module fixture)
    report = _report()
    check_main_kernels_meet_targets_or_ceilings(report)
    check_bloated_kernels_are_flagged(report)
    check_yardsticks_are_budgeted_against(report)


def check_main_kernels_meet_targets_or_ceilings(report):
    bad = kr.check_budgets(report["rows"])
    assert not bad, "\n".join(bad)
    names = {r["kernel"] for r in report["rows"]}
    assert names >= set(kr.CEILINGS) | set(kr.BUDGETS), names
    for r in report["rows"]:
        assert r["mma"] == r["mma_expected"] and not r["spills"], r["kernel"]
    print(kr.format_table(report), f"\ncompiled in {report['compile_seconds_total']} s")


def check_bloated_kernels_are_flagged(report):
    # the check can fail: a loop 5 % over its target (enforced), one 10 % over its ceiling, a kernel that
    # spills, one on mma.sync
    rows = copy.deepcopy(report["rows"])
    ystick = next(r for r in rows if r["kernel"] == "softmax_fwd")["loops"]["full"]["per_element"]
    lssa = next(r for r in rows if r["kernel"] == "lssa_fwd")
    lssa["loops"]["full"]["per_element"] = ystick * kr.BUDGETS["lssa_fwd"][1]["full"][1] * 1.05
    lssar = next(r for r in rows if r["kernel"] == "lssar_dq")
    lssar["loops"]["full"]["per_element"] = kr.CEILINGS["lssar_dq"]["full"] * 1.10
    dq = next(r for r in rows if r["kernel"] == "lssa_dq")
    dq["spills"], dq["spill_instructions"] = True, 12
    dkdv = next(r for r in rows if r["kernel"] == "lssa_dkdv")
    dkdv["mma"] = "HMMA"
    bad = kr.check_budgets(rows)
    assert any("lssa_fwd" in b and "target" in b for b in bad), bad
    assert any("lssar_dq" in b and "ceiling" in b for b in bad), bad
    assert any("lssa_dq" in b and "spills" in b for b in bad), bad
    assert any("lssa_dkdv" in b and "HGMMA" in b for b in bad), bad


def check_yardsticks_are_budgeted_against(report):
    # every LSSA loop has a ratio against the softmax yardstick compiled in the same tiles
    for r in report["rows"]:
        if r["kernel"] in kr.BUDGETS:
            assert set(r["budget"]) == set(kr.BUDGETS[r["kernel"]][1]), r["kernel"]
            y = next(x for x in report["rows"] if x["kernel"] == kr.BUDGETS[r["kernel"]][0])
            assert (y["BM"], y["BN"], y["num_warps"]) == (r["BM"], r["BN"], r["num_warps"])


def test_half_power_measurement_orders_the_roundings():
    # scripts/measure_half_power.py (the decisions page's accuracy figures for a half-precision power), small:
    # exact products give only the operand rounding; float16 products add to it, bfloat16 products more
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "measure_half_power.py"
    spec = importlib.util.spec_from_file_location("measure_half_power", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import torch

    for dtype in (torch.bfloat16, torch.float16):
        err = mod.measure(dtype, L=128, D=32, heads=2, seed=0)
        assert err["float32"] < err["float16"] < err["bfloat16"], (dtype, err)
        assert err["float32"] < 2 ** -8, err  # no worse than one rounding of P to bfloat16


def test_plot_loops_draws_each_budgeted_loop_and_its_yardstick():
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    rep = json.loads((Path(__file__).resolve().parent.parent / "results/kernels/kernel_report.json").read_text())
    ax = kr.plot_loops(rep)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    full = [f"{k} {loop}" for k, (_, loops) in kr.BUDGETS.items() for loop in loops if loop.endswith("full")]
    assert set(full) <= set(labels) and {"softmax_fwd full", "softmax_bwd full"} <= set(labels), labels
    assert len(labels) == len(set(labels))  # each yardstick once
    assert len(ax.lines) == len(full)  # one target mark per budgeted loop
