"""Presets for the notebooks: the one check of a `parameters` cell, the presets/<name>.yaml files, and
`python -m freeatten_core reproduce` (argument handling; one real papermill run on a tiny chapter)."""

import ast
import json
import shutil
from pathlib import Path

import nbformat
import pytest

from freeatten_core import presets, reproduce

ROOT = Path(__file__).resolve().parent.parent


def _parameters_cell(nb_path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: one cell tagged parameters"
    return cells[0].source


def _namespace(notebook: str, **values) -> dict:
    ns = {}
    exec(_parameters_cell(ROOT / "notebooks" / f"{notebook}.ipynb"), ns)
    ns.pop("__builtins__")
    ns.update(values)
    return ns


@pytest.mark.parametrize("notebook", list(presets.NOTEBOOK_PARAMETERS))
def test_registered_chapter_defines_exactly_its_parameters_and_checks_them(notebook):
    source = _parameters_cell(ROOT / "notebooks" / f"{notebook}.ipynb")
    assigned = {n.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    assert assigned == {"preset", *presets.NOTEBOOK_PARAMETERS[notebook]["checks"]}
    nb = nbformat.read(ROOT / "notebooks" / f"{notebook}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = code[[i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])][0] + 1]
    assert f'check_parameters("{notebook}", globals())' in first.source  # right after (papermill's) cell
    for name in presets.PRESETS:  # every preset resolves to valid values
        presets.check_parameters(notebook, _namespace(notebook, preset=name))


def test_none_takes_the_preset_value_and_an_explicit_value_wins():
    ns = _namespace("02_entropy_scaling", preset="cpu")
    got = presets.check_parameters("02_entropy_scaling", ns)
    assert got["lengths"] == presets.NOTEBOOK_PARAMETERS["02_entropy_scaling"]["presets"]["cpu"]["lengths"]
    assert ns["trials"] == got["trials"] == presets.NOTEBOOK_PARAMETERS["02_entropy_scaling"]["presets"]["cpu"]["trials"]
    ns = _namespace("02_entropy_scaling", preset="gpu", lengths=[16, 32])
    assert presets.check_parameters("02_entropy_scaling", ns)["lengths"] == [16, 32]


def test_unknown_preset_bad_value_and_missing_parameter_are_named():
    with pytest.raises(ValueError, match=r"unknown preset 'cpux'; valid presets: ci, cpu, gpu, paper"):
        presets.check_parameters("02_entropy_scaling", _namespace("02_entropy_scaling", preset="cpux"))
    with pytest.raises(ValueError, match=r"parameter trials must be an integer >= 1, got 0"):
        presets.check_parameters("02_entropy_scaling", _namespace("02_entropy_scaling", trials=0))
    with pytest.raises(ValueError, match=r"parameter lengths must be a non-empty list .* got '\[16, 1024\]'"):
        presets.check_parameters("02_entropy_scaling", _namespace("02_entropy_scaling", lengths="[16, 1024]"))
    with pytest.raises(ValueError, match=r"unknown variant\(s\) 'nope'"):
        presets.check_parameters("04_training_extrapolation", _namespace("04_training_extrapolation",
                                                                          variants=["nope"]))
    ns = _namespace("01_softmax_decomposition")
    del ns["row_length"]
    with pytest.raises(ValueError, match="the parameters cell does not define row_length"):
        presets.check_parameters("01_softmax_decomposition", ns)
    with pytest.raises(ValueError, match="has no parameters registered"):
        presets.check_parameters("99_nothing", {})


def test_an_injected_parameter_the_chapter_does_not_have_is_named():
    ns = _namespace("02_entropy_scaling", preset="cpu", trialz=8)
    # what IPython holds when the check runs: ..., the parameters cell, papermill's injected cell, this cell
    ns["In"] = ["", _parameters_cell(ROOT / "notebooks" / "02_entropy_scaling.ipynb"),
                '# Parameters\npreset = "cpu"\ntrialz = 8\n', 'check_parameters("02_entropy_scaling", globals())']
    with pytest.raises(ValueError, match=r"unknown parameter 'trialz' for 02_entropy_scaling; valid parameters: "
                                         r"preset, d, lengths"):
        presets.check_parameters("02_entropy_scaling", ns)
    ns["In"][-2] = '# Parameters\npreset = "cpu"\ntrials = 8\n'
    del ns["trialz"]
    assert presets.check_parameters("02_entropy_scaling", ns)["trials"] == 8


def test_preset_files_are_generated_and_checked(tmp_path, capsys):
    assert presets.main(["--check"]) == 0, "presets/*.yaml out of date: python -m freeatten_core presets --write"
    assert presets.main(["--write", "--dir", str(tmp_path)]) == 0
    text = (tmp_path / "cpu.yaml").read_text()
    assert text.splitlines()[-1] == "preset: cpu" and text == presets.preset_file_text("cpu")
    (tmp_path / "gpu.yaml").write_text("preset: gpu\n")
    assert presets.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "out of date: gpu.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "cpux"], "unknown preset 'cpux'; valid presets: ci, cpu, gpu, paper"),
    (["--preset", "cpu", "--notebooks", "07"], "unknown chapter '07'"),
    (["--preset", "gpu", "--seeds", "1"], "preset 'gpu' has no seed runs"),
    (["--preset", "cpu", "--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--preset", "cpu", "--seeds", "1,1"], "--seeds must be distinct"),
    (["--preset", "gpu", "--notebooks", "none"], "nothing to run"),
    (["--preset", "cpu", "--timeout", "0"], "--timeout must be >= 1"),
])
def test_reproduce_refuses_bad_arguments_before_running_anything(argv, message, tmp_path, capsys):
    assert reproduce.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reproduce_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert reproduce.main(["--preset", "ci", "--out", str(tmp_path / "f"), "--seeds", "none"]) == 2
    assert "--out" in capsys.readouterr().err


def test_reproduce_dry_run_prints_the_plan(tmp_path, capsys):
    assert reproduce.main(["--preset", "cpu", "--out", str(tmp_path / "out"), "--dry-run",
                           "--notebooks", "02,04"]) == 0
    out = capsys.readouterr().out
    assert "02_entropy_scaling: papermill with {'preset': 'cpu'}" in out
    assert "'results_dir': " in out and "04_training_extrapolation" in out
    seeds = presets.SEED_RUNS["cpu"]["seeds"]
    assert out.count("experiments extrapolation --preset cpu") == len(seeds)
    assert not (tmp_path / "out").exists()


def test_reproduce_executes_a_chapter_with_papermill_at_the_preset(tmp_path, capsys):
    """One real run: a tiny chapter with the entropy chapter's parameters cell, executed at the cpu preset."""
    import papermill

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(_parameters_cell(ROOT / "notebooks" / "02_entropy_scaling.ipynb"))
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        'from freeatten_core.presets import check_parameters\ncheck_parameters("02_entropy_scaling", globals())\n'
        'print("lengths", lengths, "trials", trials)')]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    chapters = tmp_path / "notebooks"
    chapters.mkdir()
    nbformat.write(nb, chapters / "02_entropy_scaling.ipynb")
    out = tmp_path / "out"
    assert reproduce.main(["--preset", "cpu", "--notebook-dir", str(chapters), "--out", str(out),
                           "--seeds", "none", "--run-dir", str(tmp_path / "runs")]) == 0
    done = nbformat.read(out / "02_entropy_scaling.ipynb", as_version=4)
    cpu = presets.NOTEBOOK_PARAMETERS["02_entropy_scaling"]["presets"]["cpu"]
    assert done.cells[-1].outputs[0]["text"].strip() == f"lengths {cpu['lengths']} trials {cpu['trials']}"
    prov = done.metadata["freeatten"]["provenance"]
    assert {"device", "git_commit", "command", "date_utc"} <= set(prov) and "--preset cpu" in prov["command"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "cpu" and manifest["notebooks"][0]["status"] == "ok"
    # a parameter the chapter does not have stops the chapter with a message naming it
    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter 'trialz'"):
        papermill.execute_notebook(str(chapters / "02_entropy_scaling.ipynb"), None, kernel_name="python3",
                                   parameters={"preset": "cpu", "trialz": 3}, progress_bar=False,
                                   cwd=str(chapters))
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
