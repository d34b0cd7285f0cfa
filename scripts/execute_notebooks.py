"""Execute notebooks in place and record the numbers they pin down.

    python scripts/execute_notebooks.py notebooks/01_softmax_decomposition.ipynb [...]

Uses nbclient with the `python3` kernel of the current environment; a cell that raises stops with an error.
The stored outputs of cells marked `# NBVAL_CHECK_OUTPUT` are what `pytest --nbval-lax` compares as text; the
numbers a notebook passes to `Expectations.check` are recorded (with provenance) under `results/notebooks/`,
and re-executions assert them within their stated tolerances.
"""

import os
import sys
import time

import nbformat
from nbclient import NotebookClient


def main(paths):
    os.environ["FREEATTEN_RECORD_EXPECTED"] = "1"  # inherited by the kernel: Expectations record, not check
    for path in paths:
        t0 = time.time()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}).execute()
        for cell in nb.cells:  # keep the stored notebook free of run-specific metadata
            cell.metadata.pop("execution", None)
        nbformat.write(nb, path)
        print(f"{path}: executed in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
