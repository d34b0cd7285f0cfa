"""Execute notebooks in place (their committed outputs are what `pytest --nbval` compares against).

    python scripts/execute_notebooks.py notebooks/01_softmax_decomposition.ipynb [...]

Uses nbclient with the `python3` kernel of the current environment; a cell that raises stops with an error.
"""

import sys
import time

import nbformat
from nbclient import NotebookClient


def main(paths):
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
