"""Numbers a notebook expects: recorded once with provenance, checked with stated tolerances on every re-run.

Why this exists: the last digits of a float computed on a CPU depend on the CPU (which SIMD kernels ATen
dispatches to, how BLAS blocks a matmul) and on the thread count, and a training run amplifies those
differences over its steps. Comparing printed floats as text therefore fails on machines other than the one
that stored the outputs, while printing fewer digits only moves the problem to rounding boundaries. A
notebook instead calls :meth:`Expectations.check` on each number it wants to pin down::

    expect = Expectations("04_training_extrapolation", params=dict(preset=preset, ...))
    expect.check("softmax loss_last 16x", value, atol=0.03, why="CPU training spread")

* **record mode** (``FREEATTEN_RECORD_EXPECTED=1``, set by ``scripts/execute_notebooks.py``): the value is
  stored in ``results/notebooks/<name>.json`` together with the parameters and provenance of the run;
* **check mode** (default, e.g. under ``pytest --nbval-lax``): when the file holds a value recorded with the
  same parameters, ``|value - expected| <= atol + rtol·|expected|`` is asserted, and the error names the
  quantity, both values, the tolerance and why it is that wide. Runs with other parameters (another preset)
  have nothing to compare with and are only reported as such.

Tolerances follow from the quantity: a float32 forward value is good to a relative ~1e-5 whatever the CPU,
a float64 identity to a few ulps, a CPU training loss to the spread measured across CPU capabilities and
thread counts (``make test-portability``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .provenance import provenance

RECORD_ENV = "FREEATTEN_RECORD_EXPECTED"
DIR_ENV = "FREEATTEN_EXPECTED_DIR"  # another directory of recorded values (the tests use it on copies)
SPREAD_FILE = "results/notebooks/cpu_spread.json"  # measured by scripts/measure_spread.py
SPREAD_FACTOR = 2.0
"""A ``spread=True`` check allows twice the spread measured across the emulated machines: the CPUs a reader has
may differ more than the ones emulated here (another vendor's BLAS paths)."""
SPREAD_FLOOR = 0.01
"""... and at least this much (nats), for numbers that happened to agree on every emulated machine."""


def repo_root() -> Path:
    """The repository that holds this package (where ``results/`` lives)."""
    return Path(__file__).resolve().parent.parent


class ExpectationError(AssertionError):
    """A number is outside the tolerance of its recorded value."""


class Expectations:
    """The recorded numbers of one notebook for one set of parameters (see the module docstring)."""

    def __init__(self, name: str, params: dict, directory: str | os.PathLike | None = None):
        self.name = name
        self.params = json.loads(json.dumps(params, sort_keys=True))  # canonical, JSON-comparable
        directory = directory or os.environ.get(DIR_ENV) or repo_root() / "results" / "notebooks"
        self.path = Path(directory) / f"{name}.json"
        self.record = os.environ.get(RECORD_ENV, "0") == "1"
        self.checked: list[dict] = []
        stored = json.loads(self.path.read_text()) if self.path.exists() else None
        if self.record:
            self._data = {"notebook": name, "params": self.params,
                          "provenance": provenance(command=f"scripts/execute_notebooks.py notebooks/{name}.ipynb"),
                          "values": {}}
        else:
            self._data = stored if stored is not None and stored.get("params") == self.params else None

    @property
    def comparable(self) -> bool:
        """Whether recorded values exist for these parameters (check mode)."""
        return not self.record and self._data is not None

    def check(self, label: str, value: float, *, rtol: float = 0.0, atol: float = 0.0, why: str = "",
              spread: bool = False) -> float:
        """Record ``value`` (record mode) or assert it is within tolerance of the recorded one; returns it.

        ``spread=True`` (for results of CPU training, which carries rounding differences through its steps):
        the tolerance is ``SPREAD_FACTOR`` times the spread of this number measured across CPU capabilities
        and thread counts (``results/notebooks/cpu_spread.json``, made by ``scripts/measure_spread.py``), and
        at least ``SPREAD_FLOOR``.
        """
        value = float(value)
        if spread:
            measured = self._measured_spread(label)
            atol = max(atol, SPREAD_FACTOR * measured, SPREAD_FLOOR)
            why = f"{SPREAD_FACTOR:g} x the spread {measured:.3g} measured across CPUs and thread counts"
        if not math.isfinite(value):
            raise ExpectationError(f"{self.name}: {label} is {value}, not a finite number")
        if rtol < 0 or atol < 0 or (rtol == 0 and atol == 0):
            raise ValueError(f"{label}: give a positive tolerance (rtol and/or atol), got rtol={rtol}, atol={atol}")
        row = {"label": label, "value": value, "rtol": rtol, "atol": atol, "why": why, "expected": None}
        if self.record:
            self._data["values"][label] = {"value": value, "rtol": rtol, "atol": atol, "why": why}
            self._save()
        elif self._data is not None:
            if label not in self._data["values"]:
                raise ExpectationError(f"{self.name}: no recorded value for {label!r} in {self.path.name}; "
                                       f"re-record with scripts/execute_notebooks.py")
            expected = self._data["values"][label]["value"]
            tol = atol + rtol * abs(expected)
            row["expected"] = expected
            if not abs(value - expected) <= tol:
                raise ExpectationError(
                    f"{self.name}: {label} = {value!r}, recorded {expected!r} (difference {value - expected:+.3g}, "
                    f"tolerance {tol:.3g}{': ' + why if why else ''})")
        self.checked.append(row)
        return value

    def _measured_spread(self, label: str) -> float:
        if not hasattr(self, "_spread"):
            path = repo_root() / SPREAD_FILE
            data = json.loads(path.read_text())["notebooks"].get(self.name) if path.exists() else None
            self._spread = data["spread"] if data else None
        if self._spread is None or label not in self._spread:
            if self.record or self._data is None:  # nothing will be compared: the spread is not needed yet
                return 0.0
            raise ExpectationError(f"{self.name}: no measured spread for {label!r} in {SPREAD_FILE}; "
                                   f"measure it with scripts/measure_spread.py notebooks/{self.name}.ipynb")
        return float(self._spread[label])

    def summary(self) -> str:
        """One line saying what was checked against what (for the reader; not compared as text)."""
        if self.record:
            return f"recorded {len(self.checked)} values in {self.path.parent.name}/{self.path.name}"
        if self._data is None:
            return (f"{len(self.checked)} values computed; none recorded for these parameters, so none compared")
        worst = max((abs(r["value"] - r["expected"]) / (r["atol"] + r["rtol"] * abs(r["expected"]))
                     for r in self.checked), default=0.0)
        return (f"{len(self.checked)} values within tolerance of the run recorded on "
                f"{self._data['provenance'].get('date_utc', '?')} ({self._data['provenance'].get('device', '?')}); "
                f"largest deviation {worst:.0%} of its tolerance")

    def _save(self) -> None:
        from .atomic import write_text  # the package's one atomic writer

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps(self._data, indent=1, sort_keys=False) + "\n")

