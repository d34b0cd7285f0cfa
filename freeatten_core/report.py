"""Tables of recorded results for the book: the paper's numbers beside this project's, with provenance.

The book's introduction and its "Results against the paper" page call these functions at build time, so every
number they show is read from a file under ``results/`` (never typed by hand), and every table says which run
it came from (device, preset, commit, date). Three sources:

* ``results/notebooks/04_training_extrapolation.json``: the recorded run of the training chapter at the CPU
  ``ci`` preset (written by ``scripts/execute_notebooks.py``);
* ``results/extrapolation/<variant>.json``: GPU runs of the ``gpu`` preset (``make gpu-extrapolation``), if any;
* ``results/kernels/*.json``: the compiled-code report of the fused kernels
  (``python -m freeatten_core kernel-report``), if any.
"""

from __future__ import annotations

import json
from pathlib import Path

from .experiments import DEGRADE_THRESHOLD, FLAT_TOLERANCE, PAPER_TABLE

ROOT = Path(__file__).resolve().parent.parent
CI_RECORD = Path("results/notebooks/04_training_extrapolation.json")
GPU_DIR = Path("results/extrapolation")
KERNEL_DIR = Path("results/kernels")

# measured variant -> (row of the paper's table, label in the book)
PAPER_ROWS = {
    "softmax": ("softmax", "Softmax"),
    "lssa": ("lssa", "LSSA"),
    "lssar": ("lssar", "LSSAR (p = 15)"),
    "lssa+reweight@eval": (None, "LSSA + re-weighting at inference"),
    "ssmax": (None, "SSMax"),
    "sigmoid": ("sigmoid", "Sigmoid"),
}
METRICS = ("loss_window", "loss_last")


def _root(root) -> Path:
    return Path(root) if root is not None else ROOT


def load_ci_record(root=None) -> dict | None:
    """The recorded ``ci`` run of the training chapter as ``{"losses": {variant: {metric: {k: loss}}},
    "provenance": {...}, "params": {...}}``, or None when the file does not exist."""
    path = _root(root) / CI_RECORD
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    losses: dict[str, dict[str, dict[int, float]]] = {}
    for key, entry in data.get("values", {}).items():
        # keys look like "lssar loss_last 16x"
        parts = key.rsplit(" ", 2)
        if len(parts) != 3 or parts[1] not in METRICS or not parts[2].endswith("x"):
            continue
        variant, metric, factor = parts[0], parts[1], int(parts[2][:-1])
        losses.setdefault(variant, {}).setdefault(metric, {})[factor] = float(entry["value"])
    return {"losses": losses, "provenance": data.get("provenance", {}), "params": data.get("params", {}),
            "path": str(CI_RECORD)}


def load_gpu_runs(root=None) -> dict | None:
    """GPU extrapolation runs (``results/extrapolation/<variant>.json``) in the shape of :func:`load_ci_record`,
    or None when there are none. Only files whose provenance names a CUDA device are taken."""
    folder = _root(root) / GPU_DIR
    losses, prov = {}, {}
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "results" not in data:
            continue
        p = data.get("provenance", {})
        if not str(p.get("device", "")).startswith("cuda"):
            continue
        losses[path.stem] = {m: {int(k): float(v[m]) for k, v in data["results"].items() if m in v}
                             for m in METRICS}
        prov = p
    if not losses:
        return None
    return {"losses": losses, "provenance": prov, "params": {"preset": "gpu"}, "path": str(GPU_DIR)}


def provenance_line(record: dict) -> str:
    """One sentence naming where a recorded run came from."""
    p = record.get("provenance", {})
    preset = record.get("params", {}).get("preset", "?")
    commit = str(p.get("git_commit") or "unknown commit")
    short = commit[:10] + (" (uncommitted changes)" if commit.endswith("+dirty") else "")
    return (f"`{preset}` preset on {p.get('device', 'an unknown device')}, torch {p.get('torch', '?')}, "
            f"commit {short}, {p.get('date_utc', 'date unknown')} (`{record.get('path', '?')}`)")


def shape(rise: float, start: float) -> str:
    """'flat', 'degrades' or 'mild rise', with the thresholds the training chapter fixed before any run."""
    if rise <= FLAT_TOLERANCE * start:
        return "flat"
    if rise > DEGRADE_THRESHOLD:
        return "degrades"
    return "mild rise"


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _signed(x) -> str:
    return "–" if x is None else f"{x:+.2f}"


def extrapolation_table(record: dict, metric: str = "loss_last", factor: int = 8) -> str:
    """A Markdown table: per method, the paper's loss at 1× and ``factor``× the training length and its rise,
    the recorded run's, the run's loss at its longest length, the shape of each curve (paper / run) and whether
    the shapes agree.

    Losses are not comparable across the two (different data, tokenizer, model size and training length):
    the comparison is of the *shape*, the rise from 1× to ``factor``×, with the thresholds of
    ``freeatten_core.experiments``.
    """
    losses = record["losses"]
    longest = max((max(m[metric]) for m in losses.values() if m.get(metric)), default=factor)
    lines = [f"| method | paper: 1× → {factor}× (rise) | this run: 1× → {factor}× (rise) | this run: {longest}× "
             f"| shape: paper / run | same shape? |",
             "|---|---|---|---|---|---|"]
    for variant, (paper_key, label) in PAPER_ROWS.items():
        if variant not in losses and paper_key is None:
            continue
        paper = PAPER_TABLE.get(paper_key) if paper_key else None
        p1, pk = (paper.get(1), paper.get(factor)) if paper else (None, None)
        p_rise = pk - p1 if paper and pk is not None else None
        p_shape = shape(p_rise, p1) if p_rise is not None else "–"
        m = losses.get(variant, {}).get(metric, {})
        m1, mk, ml = m.get(1), m.get(factor), m.get(longest)
        m_rise = mk - m1 if m1 is not None and mk is not None else None
        m_shape = shape(m_rise, m1) if m_rise is not None else "not run"
        same = "–" if p_rise is None or m_rise is None else ("yes" if p_shape == m_shape else "**no**")
        paper_cell = "–" if p_rise is None else f"{_fmt(p1)} → {_fmt(pk)} ({_signed(p_rise)})"
        run_cell = "–" if m_rise is None else f"{_fmt(m1)} → {_fmt(mk)} ({_signed(m_rise)})"
        lines.append(f"| {label} | {paper_cell} | {run_cell} | {_fmt(ml)} | {p_shape} / {m_shape} | {same} |")
    return "\n".join(lines)


def kernel_reports(root=None) -> list[tuple[str, dict]]:
    """``[(path, report)]`` for every compiled-code kernel report under ``results/kernels/``."""
    folder = _root(root) / KERNEL_DIR
    out = []
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            out.append((str(path.relative_to(_root(root))), data))
    return out


def kernel_table(report: dict, arch: str = "sm_90a") -> str:
    """A Markdown table of one kernel report: SASS instructions and special-function (MUFU) instructions per
    attention element in each loop of each kernel, for one architecture. These are counts of compiled code,
    not timings."""
    lines = ["| kernel | head dim | dtype | tile | spills | loop | instructions / element | MUFU / element |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r.get("arch") != arch:
            continue
        tile = f"{r.get('BM', '?')}×{r.get('BN', '?')}"
        spills = "yes" if r.get("spills") or r.get("spill_instructions") else "no"
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r.get('head_dim')} | {r.get('dtype')} | {tile} | – | "
                         f"does not compile | – | – |")
            continue
        for loop, d in (r.get("loops") or {"–": {}}).items():
            lines.append(f"| {r['kernel']} | {r.get('head_dim')} | {r.get('dtype')} | {tile} | {spills} | {loop} "
                         f"| {_fmt(d.get('per_element'))} | {_fmt(d.get('mufu_total_per_element'))} |")
    return "\n".join(lines)
