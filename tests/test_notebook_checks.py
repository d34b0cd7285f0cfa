"""The notebook check itself: it passes on a faithful copy and fails when a stored number is wrong.

``make test`` runs ``pytest --nbval-lax``: cells marked ``# NBVAL_CHECK_OUTPUT`` are compared as text, and the
numbers a notebook pins with :class:`freeatten_core.expected.Expectations` are asserted against the recorded run.
Here a copy of the entropy chapter at a small size is executed (recording its numbers), then checked three
ways: unchanged (must pass), with one stored output of a checked cell changed (must fail), and with one
recorded number moved beyond its tolerance (must fail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from freeatten_core.expected import DIR_ENV, RECORD_ENV, ExpectationError, Expectations

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_entropy_scaling.ipynb"
SMALL = "lengths = [16, 64]\ntrials = 1\nn_queries = 4\n"


def _env(expected_dir: Path, record: bool) -> dict:
    env = dict(os.environ, **{DIR_ENV: str(expected_dir), RECORD_ENV: "1" if record else "0"})
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _nbval(path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                           "--nbval-lax", str(path), "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg")],
                          cwd=path.parent, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def executed_copy(tmp_path_factory):
    """A small copy of the chapter, executed in record mode: stored outputs + recorded numbers."""
    from nbclient import NotebookClient

    tmp = tmp_path_factory.mktemp("nbcheck")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(SMALL))  # what papermill's injected cell does
    old = dict(os.environ)
    os.environ.update(_env(tmp, record=True))
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    path = tmp / "copy.ipynb"
    nbformat.write(nb, path)
    assert (tmp / "02_entropy_scaling.json").exists()
    return path


def _checked_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# NBVAL_CHECK_OUTPUT")]


def test_faithful_copy_passes(executed_copy):
    r = _nbval(executed_copy, _env(executed_copy.parent, record=False))
    assert r.returncode == 0, r.stdout[-3000:]


def test_wrong_stored_output_fails(executed_copy, tmp_path):
    nb = nbformat.read(executed_copy, as_version=4)
    cell = _checked_cells(nb)[0]
    text = cell.outputs[0]["text"]
    assert "7 methods" in text
    cell.outputs[0]["text"] = text.replace("7 methods", "8 methods")  # one number changed
    path = tmp_path / "tampered.ipynb"
    nbformat.write(nb, path)
    r = _nbval(path, _env(executed_copy.parent, record=False))
    assert r.returncode != 0 and "8 methods" in r.stdout, r.stdout[-3000:]


def test_wrong_recorded_number_fails(executed_copy, tmp_path):
    rec = json.loads((executed_copy.parent / "02_entropy_scaling.json").read_text())
    label, entry = next(iter(rec["values"].items()))
    entry["value"] *= 1 + 1e-6  # far beyond the float64 tolerance (1e-9), far below what text would show
    (tmp_path / "02_entropy_scaling.json").write_text(json.dumps(rec))
    path = tmp_path / "copy.ipynb"
    path.write_bytes(executed_copy.read_bytes())
    r = _nbval(path, _env(tmp_path, record=False))
    assert r.returncode != 0 and "ExpectationError" in r.stdout and label in r.stdout, r.stdout[-3000:]


def test_expectations_unit(tmp_path, monkeypatch):
    monkeypatch.setenv(RECORD_ENV, "1")
    e = Expectations("nb", params={"preset": "ci"}, directory=tmp_path)
    e.check("loss", 2.5, atol=0.01)
    with pytest.raises(ExpectationError, match="not a finite number"):
        e.check("nan", float("nan"), atol=1)
    with pytest.raises(ValueError, match="positive tolerance"):
        e.check("x", 1.0)
    monkeypatch.setenv(RECORD_ENV, "0")
    same = Expectations("nb", params={"preset": "ci"}, directory=tmp_path)
    assert same.comparable
    same.check("loss", 2.509, atol=0.01)
    with pytest.raises(ExpectationError, match=r"loss = 2\.52.*recorded 2\.5.*tolerance 0\.01"):
        same.check("loss", 2.52, atol=0.01)
    with pytest.raises(ExpectationError, match="no recorded value"):
        same.check("other", 1.0, atol=1)
    other = Expectations("nb", params={"preset": "gpu"}, directory=tmp_path)  # other parameters: nothing to compare
    assert not other.comparable
    other.check("loss", 99.0, atol=0.01)
    assert "none compared" in other.summary()
