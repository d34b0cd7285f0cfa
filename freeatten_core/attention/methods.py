"""The method registry: names, one-line formulas, options and their checks.

This table is the single source of the method list: the public docstring, the book's method table and the
option validation all read it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Method:
    name: str
    formula: str
    family: str  # "paper", "ablation: decomposition", "ablation: re-weighting", "baseline"
    options: dict = field(default_factory=dict)  # option name -> default
    normalised: bool = True  # rows of the weight matrix sum to 1
    phi: str | None = None  # decomposition ablation: the positivity map (the weights are phi or l1(phi))


_REWEIGHT = {"p": 15.0, "offset_rows": 3}
POSITIVITY_MAP_NAMES: tuple[str, ...] = ("exp", "softplus", "relu", "sigmoid")
"""The positivity maps φ of the decomposition ablation (their formulas: ``reference.POSITIVITY_MAPS``)."""

_TABLE = [
    Method("softmax", "softmax(q·k/√d)", "paper"),
    Method("lssa", "ℓ1(softplus(ln d·ln N_i·q̂·k̂))", "paper"),
    Method("lssar", "re-weight(LSSA): (N_i·A − O_i)₊^p, ℓ1", "paper", dict(_REWEIGHT)),
    Method("softmax_reweight", "re-weight(softmax)", "ablation: re-weighting", dict(_REWEIGHT)),
    Method("sigmoid_l1_reweight", "re-weight(ℓ1(σ(ln d·ln N_i·q̂·k̂)))", "ablation: re-weighting", dict(_REWEIGHT)),
    *[
        Method(f"{phi}_{'l1' if l1 else 'nol1'}", f"{'ℓ1(' if l1 else ''}{phi}(q·k/√d){')' if l1 else ''}",
               "ablation: decomposition", normalised=l1, phi=phi)
        for phi in POSITIVITY_MAP_NAMES for l1 in (True, False)
    ],
    Method("sigmoid", "σ(q·k/√d − ln N_i)", "baseline", normalised=False),
    Method("relu", "ReLU(q·k/√d) / N_i", "baseline", normalised=False),
    Method("ssmax", "softmax(s·ln N_i·q·k/√d)", "baseline", {"s": 1.0}),
    Method("softmax_qknorm", "softmax(s·q̂·k̂) (QK-norm)", "baseline", {"s": 10.0}),
    Method("softmax_window", "softmax(q·k/√d) over the last W keys", "baseline", {"window": 256}),
    Method("linear", "ℓ1(φ(q)·φ(k)), φ = elu + 1", "baseline"),
]

REGISTRY: dict[str, Method] = {m.name: m for m in _TABLE}
METHODS: tuple[str, ...] = tuple(REGISTRY)
FUSED_METHODS: tuple[str, ...] = ("lssa", "lssar")
BACKENDS: tuple[str, ...] = ("auto", "reference", "triton")


P_MAX = 1000.0
"""The largest re-weighting power accepted. The float32 gradient of (x/M)^p carries a relative error of about
p·ε (∂P/∂x = pP/x amplifies the rounding of x): measured against float64 on random causal rows (L = 64…512,
d = 16…128), the largest gradient error of the reference and of the fused kernels is about 2e-6 at p = 15,
1e-4 at p = 1e3, 1e-3 at p = 3e3 and 4 (noise) at p = 1e4. Below P_MAX gradients are exact to 2e-4."""


def _check_p(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"option p must be a real number in [1, {P_MAX:g}], got {type(p).__name__} {p!r}")
    if not math.isfinite(p) or p < 1:
        raise ValueError(f"option p must be a finite number >= 1, got {p!r}")
    if p > P_MAX:
        raise ValueError(f"option p must be <= P_MAX = {P_MAX:g}, got {p!r}: above it the float32 gradients of "
                         f"the re-weighting lose all precision (relative error about p x 1.2e-7, amplified by the "
                         f"row's conditioning)")
    return float(p)


def _check_offset_rows(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"option offset_rows must be a non-negative integer, got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"option offset_rows must be >= 0, got {n}")
    return int(n)


def _check_s(s):
    if isinstance(s, torch.Tensor):
        if not s.is_floating_point() or s.ndim > 1:
            raise ValueError(f"option s must be a float or a floating tensor of shape [] or [H], got "
                             f"{s.dtype} tensor of shape {tuple(s.shape)}")
        return s
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
        raise TypeError(f"option s must be a finite real number or a tensor of shape [H], got {s!r}")
    return float(s)


def _check_window(w):
    if isinstance(w, bool) or not isinstance(w, numbers.Integral):
        raise TypeError(f"option window must be an integer >= 1 (keys per row), got {type(w).__name__} {w!r}")
    if w < 1:
        raise ValueError(f"option window must be >= 1 (the number of keys each query sees), got {w}")
    return int(w)


_CHECKS = {"p": _check_p, "offset_rows": _check_offset_rows, "s": _check_s, "window": _check_window}


def resolve(method, options: dict) -> tuple[Method, dict]:
    """Check ``method`` and its ``options``; return the method and the options with defaults filled in."""
    if not isinstance(method, str) or method not in REGISTRY:
        raise ValueError(f"unknown attention method {method!r}; valid methods: {', '.join(METHODS)}")
    m = REGISTRY[method]
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        valid = ", ".join(m.options) if m.options else "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; valid options: {valid}")
    resolved = dict(m.options)
    for name, value in options.items():
        resolved[name] = _CHECKS[name](value)
    return m, resolved


def method_table() -> str:
    """The methods as a Markdown table (used by the docstring and the book)."""
    rows = ["| method | weights | family | options (defaults) | rows sum to 1 |", "|---|---|---|---|---|"]
    for m in _TABLE:
        opts = ", ".join(f"`{k}={v}`" for k, v in m.options.items()) or "–"
        rows.append(f"| `{m.name}` | {m.formula} | {m.family} | {opts} | {'yes' if m.normalised else 'no'} |")
    return "\n".join(rows)
