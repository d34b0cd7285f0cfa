"""Analysis tools: statistics of attention rows, and the entropy-versus-length measurement.

All weights come from :func:`freeatten_core.attention_weights`; nothing here re-implements a method.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .attention import attention_weights


def row_entropy(w: torch.Tensor) -> torch.Tensor:
    """Shannon entropy −Σ_j w_ij ln w_ij (nats) of each row of ``w`` [..., Lk] (0·ln 0 = 0)."""
    logw = torch.log(torch.where(w > 0, w, torch.ones_like(w)))
    return -(w * logw).sum(-1)


def max_weight(w: torch.Tensor) -> torch.Tensor:
    """The largest weight of each row."""
    return w.amax(-1)


def mass_above_uniform(w: torch.Tensor) -> torch.Tensor:
    """Σ_j w_ij over the keys with w_ij > 1/N, where N is the row length (non-causal rows)."""
    return (w * (w > 1.0 / w.shape[-1])).sum(-1)


def needle_inputs(n_keys: int, d: int, n_queries: int, cos: float | None, seed: int = 0, away: float = 0.0):
    """Random Gaussian queries and keys ``[1, 1, L, d]`` (float64); if ``cos`` is given, key 0 is a *needle*:
    a key whose cosine similarity with every query is exactly ``cos`` and whose norm is that of a typical key.
    ``away > 0`` (needle setting only) moves the other keys by ``-away·√d·q̂``: distractors that point away
    from the query (mean cosine about ``-away/√(1+away²)``).

    ``cos=None`` gives the "comparable scores" setting (all keys alike), where a well-behaved attention should
    spread out; with a needle it should keep its focus however many distractors surround it.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, n_queries, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, n_keys, d, generator=g, dtype=torch.float64)
    if cos is not None:
        if n_queries != 1:
            raise ValueError("a needle with an exact cosine needs n_queries=1")
        qh = F.normalize(q[0, 0, 0], dim=0)
        r = torch.randn(d, generator=g, dtype=torch.float64)
        r = F.normalize(r - (r @ qh) * qh, dim=0)  # orthogonal to q
        k[0, 0, 1:] -= away * math.sqrt(d) * qh
        k[0, 0, 0] = math.sqrt(d) * (cos * qh + math.sqrt(1 - cos**2) * r)
    return q, k


def _check_measurement(methods, lengths, d, n_queries, cos, away, trials) -> None:
    """The arguments of :func:`entropy_vs_length` (the notebook parameters reach it), with clear errors."""
    def count(name, v, low):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"methods must be a non-empty dict {{label: (method, options)}}, got {methods!r}")
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, list) or not lengths:
        raise ValueError(f"lengths must be a non-empty list of integers >= 2, got {lengths!r}")
    for n in lengths:
        count("every length", n, 2)
    count("d", d, 1)
    count("n_queries", n_queries, 1)
    count("trials", trials, 1)
    if cos is not None and not (isinstance(cos, numbers.Real) and -1 < cos < 1):
        raise ValueError(f"cos must be None or a number in (-1, 1), got {cos!r}")
    if not (isinstance(away, numbers.Real) and math.isfinite(away) and away >= 0):
        raise ValueError(f"away must be a finite number >= 0, got {away!r}")


def entropy_vs_length(methods: dict, lengths, d: int = 64, n_queries: int = 32, cos: float | None = None,
                      away: float = 0.0, trials: int = 1, seed: int = 0, progress: bool = False) -> list[dict]:
    """Measure row statistics of each method as the number of keys N grows.

    ``methods`` maps a label to ``(method, options)``. Rows are non-causal with exactly N keys each, so every
    row has N_i = N. Returns one record per (label, N) with the mean entropy (nats), the entropy divided by
    ln N (1 = uniform), the largest weight, the mass above uniform and, with a needle, the needle's weight.
    ``cos``/``away``: see :func:`needle_inputs`; statistics are averaged over ``trials`` random draws.
    """
    from tqdm import tqdm

    if not isinstance(lengths, (str, bytes)) and hasattr(lengths, "__iter__"):
        lengths = list(lengths)
    _check_measurement(methods, lengths, d, n_queries, cos, away, trials)
    records = []
    nq = 1 if cos is not None else n_queries
    for n in tqdm(list(lengths), desc="lengths", disable=not progress):
        stats = {}
        for t in range(trials):
            q, k = needle_inputs(n, d, nq, cos, seed=seed + 7919 * t + n, away=away)
            for label, (method, options) in methods.items():
                w = attention_weights(q, k, method=method, causal=False, **options)[0, 0]  # [nq, N]
                row = dict(entropy=row_entropy(w).mean().item(), max_weight=max_weight(w).mean().item(),
                           mass_above_uniform=mass_above_uniform(w).mean().item())
                if cos is not None:
                    row["needle_weight"] = w[:, 0].mean().item()
                acc = stats.setdefault(label, {key: 0.0 for key in row})
                for key, value in row.items():
                    acc[key] += value / trials
        for label, acc in stats.items():
            rec = dict(label=label, method=methods[label][0], N=n, **acc)
            rec["entropy_over_lnN"] = rec["entropy"] / math.log(n) if n > 1 else float("nan")
            records.append(rec)
    return records


# ------------------------------------------------------------------------------------------------------------
# Inside a trained model: attention maps and attention sinks
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def attention_maps(model, idx: torch.Tensor) -> list[torch.Tensor]:
    """The attention weights of every layer, ``[B, H, T, T]`` each, for token ids ``idx`` ``[B, T]``, as the
    model computes them with its current method (recomputed from each layer's input through
    :func:`freeatten_core.attention_weights`, so they are the reference's weights)."""
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda mod, args, out: inputs.append((mod, args[0])))
             for b in model.transformer.h]
    try:
        model.eval()
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for attn, x in inputs:
        B, T, C = x.shape
        q, k, _ = attn.c_attn(x).split(C, dim=2)
        q, k = (t.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2) for t in (q, k))
        q, k = attn.rotary(q), attn.rotary(k)
        options = dict(attn.options)
        if attn.method == "ssmax" and attn.ssmax_s is not None and "s" not in options:
            options["s"] = attn.ssmax_s.to(q.dtype)
        maps.append(attention_weights(q, k, attn.method, causal=True, **options).float())
    return maps


def sink_share(maps: list[torch.Tensor], first: int = 1) -> torch.Tensor:
    """Share of each query's attention on the ``first`` tokens, ``[layers, heads, T]`` (mean over the batch).

    An attention sink (Xiao et al. 2023) is a head that parks most of its weight on the first token(s) whatever
    the query; at position i a uniform row would give ``first / (i + 1)``."""
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise ValueError(f"first must be an integer >= 1, got {first!r}")
    return torch.stack([m[..., :first].sum(-1).mean(0) for m in maps])
