"""One colour per method across the whole book.

Every chapter that plots a method takes its colour from :data:`METHOD_COLORS` through :func:`method_color`, so
LSSAR is the same green in the entropy chapter, the training chapter and the paper's table beside it.

    import freeatten_core.plotting as fp
    ax.plot(x, y, label="LSSAR p=15", **fp.style("LSSAR p=15"))   # color, and a dashed line where it applies

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
    "lssa+reweight@eval": "#CC79A7",  # purple-pink: LSSA weights, re-weighting only at inference
    "ssmax": "#D55E00",               # vermilion
    "sigmoid": "#56B4E9",             # sky blue
    "relu": "#7F7F7F",                # grey
    "softplus_l1": "#F0E442",         # yellow: softplus + l1 without LSSA's scale
    "linear": "#000000",              # black
    "sigmoid_l1_reweight": "#8C564B",  # brown
    "softmax_reweight": "#17BECF",    # cyan
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
    """Matplotlib keyword arguments for ``name``: its colour, and a dashed line for the variant whose
    re-weighting is switched on only at inference (evaluated with another method than it was trained with)."""
    kw = {"color": method_color(name)}
    if _key(name) == "lssa+reweight@eval":
        kw["linestyle"] = "--"
    return kw


def stamp(fig, preset: str | None = None, prov: dict | None = None) -> str:
    """Label a results figure with where it came from: device, preset, commit and date (bottom right).

    ``prov`` is a :func:`freeatten_core.provenance.provenance` record (default: this run, now). Returns the text.
    """
    if prov is None:
        from .provenance import provenance

        prov = provenance()
    commit = prov.get("git_commit") or "no commit"
    dirty = commit.endswith("+dirty")
    commit = commit.removesuffix("+dirty")[:12] + (" + local changes" if dirty else "")
    parts = [prov.get("device", "?"), f"preset {preset}" if preset else None, f"commit {commit}",
             (prov.get("date_utc") or "?")[:10]]
    text = " · ".join(p for p in parts if p)
    fig.text(0.995, 0.005, text, ha="right", va="bottom", fontsize=7, color="#555555")
    return text
