"""Tables of recorded results for the book: the paper's numbers beside this project's, with provenance.

The book's introduction and its "Results against the paper" page call these functions at build time, so every
number they show is read from a file under ``results/`` (never typed by hand), and every table says which run
it came from (device, preset, commit, date). Three sources:

* ``results/notebooks/04_training_extrapolation.json``: the recorded run of the training chapter at the CPU
  ``ci`` preset (written by ``scripts/execute_notebooks.py``);
* ``results/extrapolation/<variant>.json``: GPU runs of the ``gpu`` preset (``make gpu-extrapolation``), if any;
* ``results/kernels/*.json``: the compiled-code report of the fused kernels
  (``python -m freeatten_core kernel-report``), if any;
* ``results/<preset>/seeds/seed<N>/<variant>.json``: the extrapolation experiment repeated over training seeds
  (``python -m freeatten_core reproduce --preset cpu``), summarised as mean ± standard deviation over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from .experiments import DEGRADE_THRESHOLD, FLAT_TOLERANCE, PAPER_TABLE

ROOT = Path(__file__).resolve().parent.parent
CI_RECORD = Path("results/notebooks/04_training_extrapolation.json")
GPU_DIR = Path("results/extrapolation")
KERNEL_DIR = Path("results/kernels")
SEEDS_DIR = "results/{preset}/seeds"

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


# ------------------------------------------------------------------------------------------------------------
# Runs repeated over training seeds: mean ± standard deviation
# ------------------------------------------------------------------------------------------------------------

def load_seed_runs(preset: str = "cpu", root=None) -> dict | None:
    """The extrapolation experiment of ``preset`` repeated over seeds (``results/<preset>/seeds/seed<N>/``), or
    None when there is none. Returns ``{"preset", "seeds", "factors", "losses": {variant: {metric: {k:
    [one loss per seed]}}}, "final_train_loss": {variant: [per seed]}, "claims": {seed: [claims]},
    "provenance": [one record per seed], "path"}``; a variant missing for some seed is left out of that seed."""
    folder = _root(root) / SEEDS_DIR.format(preset=preset)
    seed_dirs = sorted((p for p in folder.glob("seed*") if p.is_dir() and p.name[4:].isdigit()),
                       key=lambda p: int(p.name[4:])) if folder.exists() else []
    losses: dict = {}
    final: dict = {}
    claims, provs, seeds, factors = {}, [], [], None
    for d in seed_dirs:
        seed = int(d.name[4:])
        found = False
        for path in sorted(d.glob("*.json")):
            if path.name == "claims.json":
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict) or "results" not in data or data.get("preset") != preset:
                continue
            found = True
            variant = data.get("variant", path.stem)
            factors = factors or [int(k) for k in data["factors"]]
            for m in METRICS:
                for k, v in data["results"].items():
                    losses.setdefault(variant, {}).setdefault(m, {}).setdefault(int(k), []).append(float(v[m]))
            final.setdefault(variant, []).append(float(data["training"]["final_loss"]))
            provs.append(data.get("provenance", {}))
        if found:
            seeds.append(seed)
            if (d / "claims.json").exists():
                claims[seed] = json.loads((d / "claims.json").read_text()).get("claims", [])
    if not seeds:
        return None
    order = [v for v in PAPER_ROWS if v in losses] + sorted(v for v in losses if v not in PAPER_ROWS)
    losses = {v: losses[v] for v in order}
    return {"preset": preset, "seeds": seeds, "factors": factors, "losses": losses, "final_train_loss": final,
            "claims": claims, "provenance": provs, "path": SEEDS_DIR.format(preset=preset),
            "params": {"preset": preset}}


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = (sum((x - mean) ** 2 for x in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, sd


def seed_provenance_line(runs: dict) -> str:
    """One sentence naming where a multi-seed run came from: device, seeds, commits (the first and the last
    when the runs span several), dates, folder."""
    provs = sorted(runs["provenance"], key=lambda p: p.get("date_utc", ""))
    devices = sorted({p.get("device", "?") for p in provs})

    commits = list(dict.fromkeys(str(p.get("git_commit") or "unknown").removesuffix("+dirty")[:10] for p in provs))
    dirty = any(str(p.get("git_commit", "")).endswith("+dirty") for p in provs)
    commit = (f"commit {commits[0]}" if len(commits) == 1 else
              f"commits {commits[0]} to {commits[-1]} ({len(commits)} commits while the runs went on)")
    commit += " with uncommitted changes in the working tree" if dirty else ""
    return (f"`{runs['preset']}` preset, training seeds {', '.join(map(str, runs['seeds']))}, on "
            f"{' / '.join(devices)}, torch {provs[0].get('torch', '?')}, {commit}, "
            f"{provs[0].get('date_utc', '?')} – {provs[-1].get('date_utc', '?')} (`{runs['path']}/`)")


def seed_table(runs: dict, metric: str = "loss_last") -> str:
    """A Markdown table: per variant, ``mean ± sd`` over seeds of ``metric`` at every length, and the rise from
    1× to the longest length (mean ± sd of the per-seed rises)."""
    factors = runs["factors"]
    kmax = max(factors)
    lines = ["| variant | seeds | " + " | ".join(f"{k}×" for k in factors) + f" | rise 1× → {kmax}× |",
             "|---|---|" + "---|" * len(factors) + "---|"]
    for variant, m in runs["losses"].items():
        vals = m[metric]
        cells = [_pm(vals[k], 3) for k in factors]
        rises = [b - a for a, b in zip(vals[1], vals[kmax])] if 1 in vals else []
        rise = "–" if not rises else _pm(rises, 3, signed=True)
        label = PAPER_ROWS.get(variant, (None, variant))[1]
        lines.append(f"| {label} | {len(vals[factors[0]])} | " + " | ".join(cells) + f" | {rise} |")
    return "\n".join(lines)


def seed_claims(runs: dict) -> list[dict]:
    """Each claim of :func:`freeatten_core.experiments.extrapolation_claims` with the number of seeds in which
    it reproduced: ``[{id, claim, paper, reproduced, of}]`` in the order of the first seed."""
    out: dict = {}
    for seed, rows in sorted(runs["claims"].items()):
        for c in rows:
            row = out.setdefault(c["id"], {"id": c["id"], "claim": c["claim"], "paper": c["paper"],
                                           "reproduced": 0, "of": 0, "measured": []})
            row["reproduced"] += bool(c["reproduced"])
            row["of"] += 1
            row["measured"].append(f"seed {seed}: {c['measured']}")
    return list(out.values())


def seed_claims_table(runs: dict) -> str:
    """A Markdown table of :func:`seed_claims`: claim, the paper's number, in how many seeds it reproduced."""
    lines = ["| claim | paper | reproduced in |", "|---|---|---|"]
    for c in seed_claims(runs):
        lines.append(f"| {c['claim']} | {c['paper']} | {c['reproduced']} of {c['of']} seeds |")
    return "\n".join(lines)


def _pm(values, digits: int = 2, signed: bool = False) -> str:
    """``mean ± sd`` over seeds, or the single value when there is one seed (one run has no spread)."""
    mean, sd = mean_sd(values)
    head = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return head if len(values) == 1 else f"{head}\u00a0±\u00a0{sd:.{digits}f}"  # no break inside a number


def paper_comparison_table(ci: dict | None = None, seeds: dict | None = None, metric: str = "loss_last") -> str:
    """The paper's losses (secondary source, approximate; no 16× column there) beside every measured run,
    length by length, with each curve's rise from 1× to 8× and its shape. One row per method and source."""
    factors = [1, 2, 4, 8, 16]
    lines = ["| method | source | " + " | ".join(f"{k}×" for k in factors) + " | rise 1× → 8× | shape to 8× |",
             "|---|---|" + "---|" * len(factors) + "---|---|"]
    for variant, (paper_key, label) in PAPER_ROWS.items():
        rows = []
        paper = PAPER_TABLE.get(paper_key) if paper_key else None
        if paper:
            cells = [_fmt(paper.get(k)) if k in paper else "missing" for k in factors]
            rise = paper[8] - paper[1]
            rows.append(("paper (secondary, approximate)", cells, _signed(rise), shape(rise, paper[1])))
        if ci is not None and variant in ci["losses"]:
            m = ci["losses"][variant][metric]
            cells = [_fmt(m.get(k)) for k in factors]
            rise = m[8] - m[1] if 8 in m and 1 in m else None
            rows.append(("`ci`, 1 seed", cells, _signed(rise), shape(rise, m[1]) if rise is not None else "–"))
        if seeds is not None and variant in seeds["losses"]:
            m = seeds["losses"][variant][metric]
            cells = [_pm(m[k]) if k in m else "–" for k in factors]
            rises = [b - a for a, b in zip(m[1], m[8])] if 1 in m and 8 in m else []
            shapes = [shape(r, a) for r, a in zip(rises, m[1])]
            counts = {s_: shapes.count(s_) for s_ in dict.fromkeys(shapes)}
            shape_cell = (next(iter(counts)) + (f" (all {len(shapes)})" if len(shapes) > 1 else "")
                          if len(counts) == 1 else ", ".join(f"{n} {s_}" for s_, n in counts.items())) or "–"
            n = len(m[1])
            rows.append((f"`{seeds['preset']}`, {n} seed{'s' if n > 1 else ''}", cells,
                         _pm(rises, signed=True) if rises else "–", shape_cell))
        for i, (source, cells, rise, sh) in enumerate(rows):
            lines.append(f"| {label if i == 0 else ''} | {source} | " + " | ".join(cells) + f" | {rise} | {sh} |")
    return "\n".join(lines)


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
