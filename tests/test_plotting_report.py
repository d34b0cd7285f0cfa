"""The book's colour palette (freeatten_core.plotting) and its result tables (freeatten_core.report)."""

import json

import pytest

from freeatten_core import plotting, report
from freeatten_core.experiments import PAPER_TABLE, VARIANTS


def test_every_method_the_book_plots_has_one_colour():
    names = [*VARIANTS, *PAPER_TABLE, "LSSAR p=15", "LSSAR p=3", "LSSAR p=1", "LSSA", "SSMax (s=1)",
             "softplus-ℓ1 (no scale)", "softmax", "exp", "softplus", "relu", "sigmoid"]
    for name in names:
        assert plotting.method_color(name).startswith("#")
    # the same method under its different names gets the same colour
    assert plotting.method_color("lssar") == plotting.method_color("LSSAR p=15") == plotting.method_color(
        "LSSAR (p = 15)")
    assert plotting.method_color("ssmax") == plotting.method_color("SSMax (s=1)")
    assert plotting.method_color("exp") == plotting.method_color("softmax")


def test_distinct_methods_have_distinct_colours():
    colours = list(plotting.METHOD_COLORS.values())
    assert len(colours) == len(set(c.lower() for c in colours))
    assert plotting.method_color("lssar p=3") != plotting.method_color("lssar")


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="known: softmax"):
        plotting.method_color("nonsense")


def test_style_dashes_the_inference_only_variant():
    assert plotting.style("lssa+reweight@eval")["linestyle"] == "--"
    assert "linestyle" not in plotting.style("lssar")


def _write_record(tmp_path, values):
    path = tmp_path / report.CI_RECORD
    path.parent.mkdir(parents=True)
    prov = {"device": "cpu: x86_64", "torch": "2.13.0+cpu", "git_commit": "0123456789abcdef+dirty",
            "date_utc": "2026-01-01T00:00:00Z"}
    path.write_text(json.dumps({"params": {"preset": "ci"}, "provenance": prov,
                                "values": {k: {"value": v} for k, v in values.items()}}))


def test_extrapolation_table_reads_the_record_and_compares_shapes(tmp_path):
    _write_record(tmp_path, {"softmax loss_last 1x": 2.0, "softmax loss_last 8x": 3.0,
                             "softmax loss_last 16x": 3.5, "lssar loss_last 1x": 2.0,
                             "lssar loss_last 8x": 2.05, "lssar loss_last 16x": 2.1,
                             "softmax final train loss": 1.9})
    rec = report.load_ci_record(tmp_path)
    assert rec["losses"]["softmax"]["loss_last"] == {1: 2.0, 8: 3.0, 16: 3.5}
    line = report.provenance_line(rec)
    assert "`ci` preset on cpu: x86_64" in line and "0123456789 (uncommitted changes)" in line
    table = report.extrapolation_table(rec)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table.splitlines()[2:]}
    assert rows["Softmax"] == ["3.19 → 6.28 (+3.09)", "2.00 → 3.00 (+1.00)", "3.50", "degrades / degrades", "yes"]
    assert rows["LSSAR (p = 15)"][-2:] == ["flat / flat", "yes"]
    assert rows["LSSA"][-2:] == ["degrades / not run", "–"]
    assert "SSMax" not in rows  # not run and not in the paper's table


def test_missing_results_are_none(tmp_path):
    assert report.load_ci_record(tmp_path) is None
    assert report.load_gpu_runs(tmp_path) is None
    assert report.kernel_reports(tmp_path) == []


def test_gpu_runs_need_a_cuda_provenance(tmp_path):
    folder = tmp_path / report.GPU_DIR
    folder.mkdir(parents=True)
    run = {"results": {"1": {"loss_window": 3.0, "loss_last": 3.0}}, "provenance": {"device": "cpu: x86_64"}}
    (folder / "lssar.json").write_text(json.dumps(run))
    assert report.load_gpu_runs(tmp_path) is None
    run["provenance"]["device"] = "cuda: NVIDIA H100"
    (folder / "lssar.json").write_text(json.dumps(run))
    assert report.load_gpu_runs(tmp_path)["losses"]["lssar"]["loss_last"] == {1: 3.0}


def test_kernel_table_lists_each_loop(tmp_path):
    folder = tmp_path / report.KERNEL_DIR
    folder.mkdir(parents=True)
    row = {"kernel": "lssa_fwd", "arch": "sm_90a", "head_dim": 64, "dtype": "bfloat16", "BM": 128, "BN": 64,
           "spills": False, "loops": {"full": {"per_element": 11.5, "mufu_total_per_element": 1.0}}}
    (folder / "k.json").write_text(json.dumps({"rows": [row, {**row, "arch": "sm_80"}]}))
    [(path, rep)] = report.kernel_reports(tmp_path)
    assert path == "results/kernels/k.json"
    lines = report.kernel_table(rep).splitlines()
    assert len(lines) == 3 and "| lssa_fwd | 64 | bfloat16 | 128×64 | no | full | 11.50 | 1.00 |" == lines[2]


def test_stamp_names_device_preset_commit_and_date():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freeatten_core.plotting import stamp

    fig = plt.figure()
    text = stamp(fig, preset="ci", prov={"device": "cpu: x86_64", "git_commit": "0123456789abcdef+dirty",
                                         "date_utc": "2026-12-01T10:00:00Z"})
    assert text == "cpu: x86_64 · preset ci · commit 0123456789ab + local changes · 2026-12-01"
    assert fig.texts[-1].get_text() == text
    plt.close(fig)


def _write_seed(tmp_path, seed, variant, last, preset="cpu", commit="aaaaaaaaaaaa", date="2026-01-02T00:00:00Z"):
    folder = tmp_path / "results" / preset / "seeds" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    results = {str(k): {"loss_window": v - 0.1, "loss_last": v} for k, v in last.items()}
    prov = {"device": "cpu: x86_64", "torch": "2.13.0+cpu", "git_commit": commit, "date_utc": date}
    (folder / f"{variant}.json").write_text(json.dumps({
        "variant": variant, "preset": preset, "factors": list(last), "results": results,
        "training": {"final_loss": 1.5}, "provenance": prov}))
    claims = [{"id": "softmax_degrades", "claim": "Softmax degrades", "paper": "+3.09", "measured": "x",
               "reproduced": seed != 2}]
    (folder / "claims.json").write_text(json.dumps({"preset": preset, "claims": claims}))


def test_seed_runs_are_summarised_as_mean_and_sample_sd(tmp_path):
    assert report.load_seed_runs("cpu", tmp_path) is None
    for seed, (a, b) in enumerate([(2.0, 3.0), (2.2, 3.4), (2.4, 3.8)]):
        _write_seed(tmp_path, seed, "softmax", {1: a, 8: b, 16: b + 0.1}, date=f"2026-01-0{seed + 1}T00:00:00Z")
    _write_seed(tmp_path, 0, "lssar", {1: 2.0, 8: 2.05, 16: 2.1})
    runs = report.load_seed_runs("cpu", tmp_path)
    assert runs["seeds"] == [0, 1, 2] and runs["factors"] == [1, 8, 16]
    assert runs["losses"]["softmax"]["loss_last"][8] == [3.0, 3.4, 3.8]
    assert report.mean_sd([3.0, 3.4, 3.8]) == pytest.approx((3.4, 0.4))
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
            for r in report.seed_table(runs).splitlines()[2:]}
    assert [c.replace("\u00a0", " ") for c in rows["Softmax"]] == ["3", "2.200 ± 0.200", "3.400 ± 0.400", "3.500 ± 0.400",
                                                                  "+1.300 ± 0.200"]
    assert rows["LSSAR (p = 15)"][0] == "1" and rows["LSSAR (p = 15)"][-1] == "+0.100"  # one seed: no spread
    assert report.seed_claims(runs)[0]["reproduced"] == 2 and report.seed_claims(runs)[0]["of"] == 3
    assert "2 of 3 seeds" in report.seed_claims_table(runs)
    assert "2026-01-01T00:00:00Z – 2026-01-03T00:00:00Z" in report.seed_provenance_line(runs)
    table = report.paper_comparison_table(None, runs)
    softmax = [r for r in table.splitlines() if "3 seeds" in r][0]
    assert "2.20\u00a0±\u00a00.20" in softmax and "degrades (all 3)" in softmax
    paper = [r for r in table.splitlines() if r.startswith("| Softmax | paper")][0]
    assert "missing" in paper  # the secondary source has no 16x column


def test_plot_over_seeds_draws_mean_band_and_points_and_stamp_lists_runs():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    mean, sd = plotting.plot_over_seeds(ax, [1, 2], [[1.0, 2.0], [3.0, 4.0]], "lssar")
    assert mean == [2.0, 3.0] and sd == pytest.approx([2 ** 0.5] * 2)
    assert ax.lines[0].get_color() == plotting.method_color("lssar") and len(ax.lines) == 3
    with pytest.raises(ValueError, match="one row per seed with 2 entries"):
        plotting.plot_over_seeds(ax, [1, 2], [[1.0]], "lssar")
    text = plotting.stamp(fig, "cpu", [{"device": "cpu: x86_64", "git_commit": "a" * 40, "date_utc": "2026-01-01"},
                                       {"device": "cpu: x86_64", "git_commit": "b" * 40 + "+dirty",
                                        "date_utc": "2026-01-03"}])
    assert text == ("cpu: x86_64 · preset cpu · commits aaaaaaaaaaaa … bbbbbbbbbbbb + local changes · "
                    "2026-01-01 – 2026-01-03")
    plt.close(fig)
