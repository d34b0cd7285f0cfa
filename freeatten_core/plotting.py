"""The book's figure conventions: one colour per method, curves over seeds with their spread, and a stamp
saying where a result came from.

Every chapter that plots a method takes its colour from :data:`METHOD_COLORS` through :func:`method_color`
(or :func:`style`), so LSSAR is the same green in the entropy chapter, the training chapter, the results page
and the paper's table beside them. A result repeated over seeds is drawn with :func:`plot_over_seeds` (mean,
a band of ± one standard deviation, every seed as a faint point). Every figure of results carries
:func:`stamp` (device, preset, commit, date). Captions, numbers and labels are the notebook cell's metadata
(``mystnb.figure``), see the book's "Contributing" page.

    import freeatten_core.plotting as fp
    ax.plot(x, y, label="LSSAR p=15", **fp.style("LSSAR p=15"))   # color, and a dashed line where it applies
    fp.plot_over_seeds(ax, factors, values_per_seed, "lssar")      # values_per_seed: [seeds][len(factors)]
    fp.stamp(fig, preset="cpu", prov=result["provenance"])

Names are matched loosely: case, spaces and a parenthesised ``(p = 15)`` do not matter, so the package's method
names (``lssar``), the variants of the training chapter (``lssa+reweight@eval``), the rows of the paper's table
(``lssar p=3``) and the labels of the entropy chapter (``LSSAR p=15``, ``SSMax (s=1)``) all resolve.
"""

from __future__ import annotations

import re

# Colour-blind-safe where it matters (the Okabe-Ito hues for the three methods of the paper), LSSAR's powers
# as shades of one green, ablation maps as the colour of the method they belong to.
METHOD_COLORS: dict[str, str] = {
    "softmax": "#0072B2",             # blue
    "lssa": "#E69F00",                # orange
    "lssar": "#009E73",               # green: LSSAR, p = 15 (the default)
    "lssar p=3": "#66C2A4",           # lighter green
    "lssar p=1": "#B2E2CE",           # lightest green
    "lssar p=7": "#3FAE85",           # between p = 3 and p = 15
    "lssar p=31": "#00573F",          # darkest green
    "lssa+reweight@eval": "#CC79A7",  # purple-pink: LSSA weights, re-weighting only at inference (p = 15)
    "lssa+reweight@eval p=1": "#F2CFE2",  # its other powers: shades of the same pink, light to dark
    "lssa+reweight@eval p=3": "#E6AACB",
    "lssa+reweight@eval p=7": "#D993BA",
    "lssa+reweight@eval p=31": "#8E3B6E",
    "ssmax": "#D55E00",               # vermilion
    "sigmoid": "#56B4E9",             # sky blue
    "relu": "#7F7F7F",                # grey
    "softplus_l1": "#F0E442",         # yellow: softplus + l1 without LSSA's scale
    "linear": "#000000",              # black
    "sigmoid_l1_reweight": "#8C564B",  # brown
    "softmax_reweight": "#17BECF",    # cyan
    "softmax_qknorm": "#332288",      # indigo: QK-norm softmax
    "softmax_window": "#999933",      # olive: sliding-window softmax
    "softmax+ntk@eval": "#882255",    # wine: softmax, NTK-scaled RoPE at inference
    "softmax+yarn@eval": "#DDCC77",   # sand: softmax, YaRN-scaled RoPE at inference
}
"""Canonical method name -> hex colour."""

# Positivity maps of the decomposition ablation: the colour of the attention built on them.
MAP_COLORS = {"exp": METHOD_COLORS["softmax"], "softplus": METHOD_COLORS["lssa"],
              "relu": METHOD_COLORS["relu"], "sigmoid": METHOD_COLORS["sigmoid"]}

_ALIASES = {
    "lssarp=15": "lssar", "lssar(p=15)": "lssar", "lssar(p=15.0)": "lssar", "lssarp=15.0": "lssar",
    "lssar(p=3)": "lssar p=3", "lssarp=3": "lssar p=3", "lssar(p=1)": "lssar p=1", "lssarp=1": "lssar p=1",
    "ssmax(s=1)": "ssmax", "scalable-softmax": "ssmax",
    "softplus-ℓ1(noscale)": "softplus_l1", "softplus-l1(noscale)": "softplus_l1", "softplus-ℓ1": "softplus_l1",
    "lssa+re-weightingatinference": "lssa+reweight@eval", "lssa+reweight": "lssa+reweight@eval",
    "exp_l1": "softmax", "softplus_l1": "softplus_l1", "relu_l1": "relu", "sigmoid_l1": "sigmoid",
}


def _key(name: str) -> str:
    k = re.sub(r"\s+", "", str(name).lower())
    if k in _ALIASES:
        return _ALIASES[k]
    for canon in METHOD_COLORS:
        if k == canon.replace(" ", ""):
            return canon
    if k in MAP_COLORS:
        return k
    raise ValueError(f"no colour for method {name!r}; known: {', '.join([*METHOD_COLORS, *MAP_COLORS])}")


def method_color(name: str) -> str:
    """The book's colour for a method, variant, table row or positivity map ``name`` (matched loosely)."""
    k = _key(name)
    return MAP_COLORS[k] if k in MAP_COLORS and k not in METHOD_COLORS else METHOD_COLORS[k]


def style(name: str) -> dict:
    """Matplotlib keyword arguments for ``name``: its colour, and a dashed line for a variant changed only at
    inference (``...@eval``: evaluated otherwise than it was trained, e.g. LSSA re-weighted at inference)."""
    kw = {"color": method_color(name)}
    if "@eval" in _key(name):
        kw["linestyle"] = "--"
    return kw


def stamp(fig, preset: str | None = None, prov=None) -> str:
    """Label a results figure with where it came from: device, preset, commit and date (bottom right).

    ``prov`` is a :func:`freeatten_core.provenance.provenance` record (default: this run, now), or a list of
    them for a figure drawn from several runs (e.g. one per seed): devices are listed once each, commits and
    dates as the range from the earliest run to the latest. Returns the text.
    """
    if prov is None:
        from .provenance import provenance

        prov = provenance()
    records = list(prov) if isinstance(prov, (list, tuple)) else [prov]
    if not records:
        raise ValueError("stamp: prov must be a provenance record or a non-empty list of them")

    def short(commit):
        commit = commit or "no commit"
        dirty = commit.endswith("+dirty")
        return commit.removesuffix("+dirty")[:12] + (" + local changes" if dirty else "")

    records = sorted(records, key=lambda r: r.get("date_utc") or "")
    devices = list(dict.fromkeys(r.get("device", "?") for r in records))
    commits = list(dict.fromkeys(short(r.get("git_commit")) for r in records))
    dates = sorted({(r.get("date_utc") or "?")[:10] for r in records})
    parts = [" / ".join(devices), f"preset {preset}" if preset else None,
             f"commit {commits[0]}" if len(commits) == 1 else f"commits {commits[0]} … {commits[-1]}",
             dates[0] if len(dates) == 1 else f"{dates[0]} – {dates[-1]}"]
    text = " · ".join(p for p in parts if p)
    fig.text(0.995, 0.005, text, ha="right", va="bottom", fontsize=7, color="#555555")
    return text


def plot_over_seeds(ax, x, values, name: str, label: str | None = None, **kwargs):
    """Draw a result repeated over seeds: the mean over seeds as a line with markers, a band of ± one sample
    standard deviation, and each seed's values as faint points, all in ``name``'s colour (:func:`style`).

    ``values``: one row per seed, one column per ``x``. Returns ``(mean, sd)`` as lists. A single seed draws its
    line alone (no band): one run has no spread to show."""
    rows = [list(map(float, r)) for r in values]
    if not rows or any(len(r) != len(x) for r in rows):
        raise ValueError(f"values must be one row per seed with {len(x)} entries each, got {values!r}")
    n = len(rows)
    mean = [sum(c) / n for c in zip(*rows)]
    sd = [(sum((v - m) ** 2 for v in c) / (n - 1)) ** 0.5 if n > 1 else 0.0 for c, m in zip(zip(*rows), mean)]
    kw = {**style(name), **kwargs}
    text = label if label is not None else name
    ax.plot(x, mean, marker="o", label=f"{text} (mean of {n} seeds)" if n > 1 else text, **kw)
    if n > 1:
        ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                        color=kw["color"], alpha=0.18, linewidth=0)
        for r in rows:
            ax.plot(x, r, linestyle="none", marker=".", color=kw["color"], alpha=0.45)
    return mean, sd
