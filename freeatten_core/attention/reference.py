"""Every attention method in plain PyTorch: the specification.

Shapes: ``q`` is ``[B, H, Lq, D]``, ``k`` and ``v`` are ``[B, H, Lk, D]``. Query row ``i`` (0-based here,
1-based in the paper) sees ``N_i`` keys:

* non-causal: all ``Lk`` keys, ``N_i = Lk``;
* causal: queries are aligned to the *last* ``Lq`` keys (bottom-right, what incremental decoding needs), so
  query ``i`` sees keys ``j <= i + Lk - Lq`` and ``N_i = Lk - Lq + i + 1``.

Grouped-query attention: ``k`` and ``v`` may have fewer heads, ``[B, H_kv, Lk, D]`` with ``H % H_kv == 0``; query
head ``h`` uses key head ``h // (H // H_kv)``. K and V are never repeated: the ``G = H // H_kv`` query heads of a
group are folded into the row dimension (``q`` as ``[B, H_kv, G·Lq, D]``), so each weight function sees ordinary
4-D tensors.

Padding and packed sequences: :func:`attention` and :func:`attention_weights` take ``visible``, a boolean
``[B, 1, Lq, Lk]`` (True: query row i may see key j), combined with the causal rule. ``N_i`` is then the number of
keys row i sees (it sets the length scale ln N_i and the re-weighting's N_i), and a row that sees no key (a query
at a padding position) outputs 0, with zero gradients. :mod:`.batching` builds ``visible`` from a key padding mask
or from ``cu_seqlens``.

Everything here materialises the ``[Lq, Lk]`` weight matrix: it is short, readable and exact, not fast.
Half-precision inputs are computed in float32 and the result is cast back; float64 inputs stay float64, so a
float64 call *is* a float64 transcription of the formulas. No epsilon enters any normalisation (see the
"Decisions" page of the book): every division is by a quantity that is provably positive, or guarded by an
exact case split.

NaN and Inf (the "Decisions" page, "NaN and Inf"): an output is NaN exactly when it depends on a non-finite
input element, and so is a gradient; every other output and gradient is what it would be if the non-finite
elements were any finite numbers. :func:`attention` and :func:`attention_weights` compute on the finite part of
the inputs and mark the dependent outputs afterwards (:class:`_NanPolicy`), because the matrix products of the
plain formulas would also spread a NaN through weights that are exactly zero (0·NaN = NaN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .methods import METHODS, POSITIVITY_MAP_NAMES, REGISTRY, Method

# --------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_counts(Lq: int, Lk: int, causal: bool, device=None, dtype=torch.float32) -> torch.Tensor:
    """``N_i``, the number of keys each query row sees, shape ``[Lq]`` (1-based counts)."""
    if causal:
        return torch.arange(Lk - Lq + 1, Lk + 1, device=device, dtype=dtype)
    return torch.full((Lq,), float(Lk), device=device, dtype=dtype)


def visible_mask(Lq: int, Lk: int, causal: bool, device=None) -> torch.Tensor | None:
    """Boolean ``[Lq, Lk]`` mask of the keys each query sees (``None`` when every key is visible)."""
    if not causal:
        return None
    i = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    return j <= i


def softplus(x: torch.Tensor) -> torch.Tensor:
    """ln(1 + e^x), exact and overflow-free for every x (no threshold, unlike ``F.softplus``)."""
    return torch.logaddexp(x, torch.zeros_like(x))


POSITIVITY_MAPS = {
    "exp": torch.exp,
    "softplus": softplus,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
}
"""The positivity maps φ of the decomposition ablation."""


def dot_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The usual scores q·k/√d, ``[B, H, Lq, Lk]``."""
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def length_scale(N: torch.Tensor, d: int) -> torch.Tensor:
    """c_i = ln(d)·ln(N_i), the entropy-invariance scale of LSSA (natural logs)."""
    return math.log(d) * torch.log(N)


def unit(x: torch.Tensor) -> torch.Tensor:
    """x/‖x‖ along the last dimension, for any finite scale of x.

    ‖x‖ of a float32 vector overflows once its entries pass about 1e19 and underflows below about 1e-19 (the
    squares leave the float range), which would turn the direction into 0 and the attention row uniform. So x
    is first divided by its largest |entry| m (the direction is unchanged, and then 1 ≤ ‖x/m‖ ≤ √d). m is
    detached: x/‖x‖ does not depend on it, so its gradient contribution is exactly zero. A zero vector has no
    direction and is mapped to 0.
    """
    m = x.abs().amax(dim=-1, keepdim=True).detach()
    return F.normalize(x / torch.where(m > 0, m, torch.ones_like(m)), dim=-1)


def lss_scores(q: torch.Tensor, k: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """LSSA scores s_ij = ln(d)·ln(N_i)·q̂_i·k̂_j with q, k on the unit sphere (:func:`unit`; no 1/√d)."""
    return length_scale(N, q.shape[-1])[:, None] * (unit(q) @ unit(k).transpose(-1, -2))


def mask_fill(x: torch.Tensor, mask: torch.Tensor | None, value: float) -> torch.Tensor:
    """``x`` with the invisible positions set to ``value``."""
    return x if mask is None else x.masked_fill(~mask, value)


def masked_softmax(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over visible keys. ``torch.softmax`` subtracts the row maximum, so it never overflows."""
    return torch.softmax(mask_fill(s, mask, float("-inf")), dim=-1)


def l1_normalise(f: torch.Tensor) -> torch.Tensor:
    """Row-wise ℓ1 normalisation of non-negative weights: A_ij = f_ij / Σ_k f_ik.

    A row whose weights are all exactly zero (only possible with φ = relu, or when exp underflows) has no
    distribution to normalise; it is returned as zeros, so its output is 0. No epsilon: the division is
    guarded by an exact case split (and stays NaN-free in backward). The split tests ``Z == 0``, not ``Z > 0``:
    a NaN sum must stay NaN, not become a row of zeros.
    """
    Z = f.sum(dim=-1, keepdim=True)
    zero = Z == 0
    return torch.where(zero, torch.zeros_like(f), f / torch.where(zero, torch.ones_like(Z), Z))


def uniform_threshold(score_bound: torch.Tensor, N: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """τ_i: the largest ``M_i = max_j x_ij`` that rounding alone can produce on an exactly uniform row.

    ``score_bound`` bounds |s_ij| on each row (``c_i = ln d·ln N_i`` for the unit-sphere scores), ``N`` the
    row counts, ``D`` the head dim, ``dtype`` the dtype the row is accumulated in. With ε its machine epsilon:

    * a score s = S·q̂·k̂ carries a rounding error of at most S·D·ε (a D-term dot product), and the positivity
      map turns it into a relative error of f of at most the same (d ln f/ds ≤ 1 for softplus, σ and exp);
    * x_ij = N_i·f_ij/Z_i − 1 then differs between keys of equal exact weight by at most 2·(S·D + 2)·ε;
    * an error in Z_i shifts every x of the row alike; a blocked or pairwise sum of N terms keeps it below
      N/16·ε for the tile sizes used here.

    So τ_i = ε·(8 + 2·S_i·D + N_i/16). A row with ``M_i ≤ τ_i`` has no weight measurably above uniform and
    keeps its ℓ1 weights (the "Decisions" page of the book: exactly uniform rows).
    """
    eps = torch.finfo(dtype).eps
    return eps * (8 + 2 * score_bound * D + N / 16)


def reweight(A: torch.Tensor, N: torch.Tensor, p: float, offset_rows: int,
             score_bound: torch.Tensor, D: int) -> torch.Tensor:
    """The re-weighting stage of LSSAR, applied to ℓ1-normalised weights ``A`` ``[..., Lq, Lk]``.

    x_ij = N_i·A_ij − O_i (O_i = 0 for rows with N_i ≤ offset_rows, else 1), r = ReLU(x)^p, P = r / Σ r.

    Computed exactly and overflow-free by dividing x by its row maximum M_i before the power:
    (ReLU(x)/M)^p ∈ [0, 1] and the row sum is ≥ 1. P does not depend on M, so M is detached (its gradient
    contribution is exactly zero). A row with M_i ≤ τ_i (:func:`uniform_threshold`: no weight above uniform
    beyond rounding, e.g. every key equal) keeps ``A``; ``score_bound`` (broadcastable to ``[..., Lq, 1]``)
    bounds the row's scores and ``D`` is the head dim. Invisible keys must have A = 0 there, which gives
    x ≤ 0 and weight 0.
    """
    N = N[:, None]
    O = (N > offset_rows).to(A.dtype)
    x = N * A - O
    M = x.amax(dim=-1, keepdim=True).detach()
    ok = M > uniform_threshold(score_bound, N, D, A.dtype)
    u = (torch.relu(x) / torch.where(ok, M, torch.ones_like(M))) ** p
    U = u.sum(dim=-1, keepdim=True)
    return torch.where(ok, u / torch.where(ok, U, torch.ones_like(U)), A)


# --------------------------------------------------------------------------------------------------------
# The methods: each maps (q, k, N, mask, options) to the weight matrix [B, H, Lq, Lk]. Names, options and
# their defaults come from the registry (methods.py); method `name` is the function `_name` below, and the
# decomposition ablation's `<phi>_l1` / `<phi>_nol1` are built by `_phi`.
# --------------------------------------------------------------------------------------------------------


def _softmax(q, k, N, mask):
    return masked_softmax(dot_scores(q, k), mask)


def _ssmax(q, k, N, mask, s):
    # Scalable-Softmax: softmax(s·ln(N_i)·q·k/√d); s is a scalar or one value per head.
    s = torch.as_tensor(s, dtype=q.dtype, device=q.device)
    s = s.reshape(1, -1, 1, 1) if s.ndim == 1 else s
    return masked_softmax(s * torch.log(N)[:, None] * dot_scores(q, k), mask)


def _softmax_qknorm(q, k, N, mask, s):
    # QK-norm (Henry et al. 2020, "Query-Key Normalization for Transformers"): softmax(s·q̂·k̂), q and k on the unit
    # sphere and no 1/√d; s is a scalar or one value per head (the GPT learns one per head unless s is given).
    s = torch.as_tensor(s, dtype=q.dtype, device=q.device)
    s = s.reshape(1, -1, 1, 1) if s.ndim == 1 else s
    return masked_softmax(s * (unit(q) @ unit(k).transpose(-1, -2)), mask)


def window_mask(mask: torch.Tensor | None, Lk: int, window: int, device=None) -> torch.Tensor:
    """The ``window`` most recent keys (highest index) among those each row sees: ``mask`` (None: every key) and
    at most ``window`` visible keys counted from the right. With the causal rule, bottom-right aligned, query row
    i at position a_i = i + Lk − Lq sees keys a_i − window < j <= a_i, N_i = min(a_i + 1, window) of them: the
    sliding window. Without the causal rule it is the last ``window`` keys of the sequence."""
    if mask is None:
        mask = torch.ones(1, Lk, dtype=torch.bool, device=device)
    newer = mask.flip(-1).cumsum(-1).flip(-1)  # visible keys at index >= j, j included
    return mask & (newer <= window)


def _softmax_window(q, k, N, mask, window):
    # Sliding-window softmax (as in Longformer's local attention and Mistral): softmax over the last `window`
    # keys each row sees. The NaN policy still treats every key the causal rule shows a row as a dependency.
    return masked_softmax(dot_scores(q, k), window_mask(mask, k.shape[-2], window, device=q.device))


def _lssa(q, k, N, mask):
    f = mask_fill(softplus(lss_scores(q, k, N)), mask, 0.0)
    return l1_normalise(f)


def _lssar(q, k, N, mask, p, offset_rows):
    D = q.shape[-1]
    return reweight(_lssa(q, k, N, mask), N, p, offset_rows, length_scale(N, D)[:, None], D)


def _dot_score_bound(q, k, mask):
    """A bound on |q_i·k_j|/√d over the keys row i sees, ``[B, H, Lq, 1]`` (Cauchy–Schwarz)."""
    knorm = k.norm(dim=-1)[..., None, :]  # [B, H, 1, Lk]
    kmax = mask_fill(knorm.expand(*knorm.shape[:-2], q.shape[-2], k.shape[-2]), mask, 0.0).amax(-1, keepdim=True)
    return (q.norm(dim=-1, keepdim=True) * kmax / math.sqrt(q.shape[-1])).detach()


def _softmax_reweight(q, k, N, mask, p, offset_rows):
    return reweight(_softmax(q, k, N, mask), N, p, offset_rows, _dot_score_bound(q, k, mask), q.shape[-1])


def _sigmoid_l1_reweight(q, k, N, mask, p, offset_rows):
    # The paper's "Sigmoid + ℓ1 + re-weighting" ablation: LSSAR with σ in place of softplus.
    f = mask_fill(torch.sigmoid(lss_scores(q, k, N)), mask, 0.0)
    D = q.shape[-1]
    return reweight(l1_normalise(f), N, p, offset_rows, length_scale(N, D)[:, None], D)


def _sigmoid(q, k, N, mask):
    # Sigmoid attention: σ(q·k/√d − ln N_i), no normalisation.
    return mask_fill(torch.sigmoid(dot_scores(q, k) - torch.log(N)[:, None]), mask, 0.0)


def _relu(q, k, N, mask):
    # ReLU attention: ReLU(q·k/√d) / N_i.
    return mask_fill(torch.relu(dot_scores(q, k)) / N[:, None], mask, 0.0)


def _log_elu1(x):
    """ln(elu(x) + 1): ln(1 + x) for x > 0, x otherwise."""
    return torch.where(x > 0, torch.log1p(x.clamp_min(0)), x)


def _linear(q, k, N, mask, chunk_elements=1 << 24):
    # Linear attention (Katharopoulos et al. 2020): weights φ(q_i)·φ(k_j) with φ = elu + 1 > 0, ℓ1-normalised.
    # φ = e^x underflows for very negative inputs, so the weights are formed in the log domain,
    # ln w_ij = logsumexp_d(ln φ(q_id) + ln φ(k_jd)), and ℓ1 becomes a softmax: exact for any input size.
    # The [rows, Lk, D] intermediate is built a block of query rows at a time.
    lq, lk = _log_elu1(q), _log_elu1(k)
    lq = lq - lq.amax(dim=-1, keepdim=True).detach()  # a per-row constant: cancels in the softmax, saves precision
    rows = max(1, chunk_elements // max(1, lq.shape[0] * lq.shape[1] * lk.shape[-2] * lk.shape[-1]))
    logw = torch.cat([torch.logsumexp(lq[..., i:i + rows, None, :] + lk[..., None, :, :], dim=-1)
                      for i in range(0, lq.shape[-2], rows)], dim=-2)
    return masked_softmax(logw, mask)


def log_softplus(x: torch.Tensor) -> torch.Tensor:
    """ln(softplus(x)) without underflow: below x = −40, softplus(x) = e^x·(1 − e^x/2 + …), so ln is x."""
    low = x < -40
    return torch.where(low, x, torch.log(softplus(torch.where(low, torch.zeros_like(x), x))))


LOG_POSITIVITY_MAPS = {"exp": lambda x: x, "softplus": log_softplus, "sigmoid": F.logsigmoid}
"""ln φ for the maps that are positive everywhere: ℓ1(φ(s)) = softmax(ln φ(s)) exactly, and this form
cannot overflow or underflow (e^s, softplus and σ of a score below about −100 underflow in float32)."""


def _phi(name: str, l1: bool):
    phi = POSITIVITY_MAPS[name]

    def weights(q, k, N, mask):
        s = dot_scores(q, k)
        if l1 and name in LOG_POSITIVITY_MAPS:  # for exp this *is* softmax
            return masked_softmax(LOG_POSITIVITY_MAPS[name](s), mask)
        f = mask_fill(phi(s), mask, 0.0)
        return l1_normalise(f) if l1 else f

    return weights


def _formula(m: Method):
    """The reference function of registry method ``m``."""
    if m.phi is not None:
        return _phi(m.phi, m.normalised)
    fn = globals().get(f"_{m.name}")
    if fn is None:
        raise NotImplementedError(f"method {m.name!r} is in the registry (methods.py) but reference.py has no "
                                  f"function _{m.name}")
    return fn


assert set(POSITIVITY_MAPS) == set(POSITIVITY_MAP_NAMES), "reference.POSITIVITY_MAPS and the registry disagree"
WEIGHT_FUNCTIONS = {name: _formula(REGISTRY[name]) for name in METHODS}
"""Method name -> weight function, derived from the registry (methods.py is the one list of names)."""


# --------------------------------------------------------------------------------------------------------
# Grouped queries and per-batch visibility
# --------------------------------------------------------------------------------------------------------


def visibility(Lq: int, Lk: int, causal, visible: torch.Tensor | None = None, device=None) -> torch.Tensor | None:
    """The keys each query row sees: the causal rule (:func:`visible_mask`) and, if given, ``visible``.

    ``causal`` may also be a visibility tensor already (what the NaN-policy helpers pass around); it is returned
    as it is. Returns None (every key visible), ``[Lq, Lk]`` or ``[B, 1, Lq, Lk]`` (bool).
    """
    if isinstance(causal, torch.Tensor):
        return causal
    rule = visible_mask(Lq, Lk, causal, device=device)
    if visible is None:
        return rule
    return visible if rule is None else visible & rule


def _fold(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """``[B, H, L, ...]`` -> ``[B, H_kv, G·L, ...]``: the G query heads of each key head as consecutive row blocks
    (row ``g·L + r`` of key head ``hk`` is row ``r`` of query head ``hk·G + g``). A view, no copy."""
    B, H, L = x.shape[:3]
    return x.reshape(B, Hkv, (H // Hkv) * L, *x.shape[3:])


def _unfold(x: torch.Tensor, H: int) -> torch.Tensor:
    """The inverse of :func:`_fold`: ``[B, H_kv, G·L, ...]`` -> ``[B, H, L, ...]``."""
    B, Hkv, R = x.shape[:3]
    return x.reshape(B, H, R // (H // Hkv), *x.shape[3:])


def _fold_vis(vis: torch.Tensor | None, G: int) -> torch.Tensor | None:
    """The visibility of the folded rows: ``[L, Lk]`` or ``[B, 1, L, Lk]`` repeated G times along the rows."""
    if vis is None or G == 1:
        return vis
    return vis.repeat(G, 1) if vis.ndim == 2 else vis.repeat(1, 1, G, 1)


def _rows(Lq, Lk, causal, visible, G, device, dtype):
    """``(N, mask, empty)`` for the weight functions on the folded rows (``R = G·Lq``).

    Without ``visible``: ``N`` ``[R]`` and ``mask`` None or ``[R, Lk]``, as always. With it: ``mask``
    ``[B, 1, R, Lk]`` and ``N`` ``[B, R, 1]`` (so that ``N[:, None]``, the way the weight functions broadcast
    ``N``, is ``[B, 1, R, 1]``). A row that sees no key (``empty`` ``[B, 1, R, 1]``) is given every key and
    ``N = Lk`` as a stand-in, so that its arithmetic stays finite; its weights are set to 0 afterwards.
    """
    if visible is None:
        N = row_counts(Lq, Lk, causal, device=device, dtype=dtype)
        mask = visible_mask(Lq, Lk, causal, device=device)
        return N.repeat(G), _fold_vis(mask, G), None
    vis = _fold_vis(visibility(Lq, Lk, causal, visible, device=device), G)  # [B, 1, R, Lk]
    n = vis.sum(dim=-1)  # [B, 1, R]
    empty = n == 0
    N = torch.where(empty, torch.full_like(n, Lk), n).to(dtype).transpose(1, 2)  # [B, R, 1]
    return N, vis | empty[..., None], empty[..., None]


def _weights(q, k, method, causal, visible=None, **options):
    """The weights of the folded rows, ``[B, H_kv, G·Lq, Lk]`` (see :func:`_fold`)."""
    ct = compute_dtype(q.dtype)
    H, Lq = q.shape[1], q.shape[2]
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    q, k = _fold(q.to(ct), Hkv), k.to(ct)
    N, mask, empty = _rows(Lq, Lk, causal, visible, G, q.device, ct)
    options = {**REGISTRY[method].options, **options}  # defaults from the registry
    s = options.get("s")
    if G > 1 and isinstance(s, torch.Tensor) and s.ndim == 1 and s.numel() > 1:  # a per-head option, per row
        options["s"] = s.reshape(Hkv, G, 1).expand(Hkv, G, Lq).reshape(1, Hkv, G * Lq, 1)
    w = WEIGHT_FUNCTIONS[method](q, k, N, mask, **options)
    return w if empty is None else w.masked_fill(empty, 0.0)


def attention_weights(q: torch.Tensor, k: torch.Tensor, method: str, causal: bool, visible=None,
                      **options) -> torch.Tensor:
    """The weight matrix ``[B, H, Lq, Lk]`` of ``method``, computed in ``compute_dtype(q.dtype)``.

    ``k`` may have fewer heads than ``q`` (grouped queries); ``visible`` (bool ``[B, 1, Lq, Lk]``) restricts the
    keys each row sees beyond the causal rule. No input checking here: :func:`freeatten_core.attention_weights`
    validates and then calls this.
    """
    H = q.shape[1]
    if _all_finite(q, k):
        return _unfold(_weights(q, k, method, causal, visible, **options), H)
    w = _unfold(_weights(_finite(q), _finite(k), method, causal, visible, **options), H)
    vis = visibility(q.shape[-2], k.shape[-2], causal, visible, device=q.device)
    return _NanPolicy.apply(w, q, k, None, _bad_weights(q, k, method, vis), vis, method)


def attention(q, k, v, method: str, causal: bool, visible=None, **options) -> torch.Tensor:
    """o = W·v with W from :func:`attention_weights`; the result has the dtype of ``q``.

    Grouped queries: the weights of the folded rows multiply the shared ``v`` directly (no copy of K or V).
    """
    H = q.shape[1]
    if _all_finite(q, k, v):
        w = _weights(q, k, method, causal, visible, **options)
        return _unfold(w @ v.to(w.dtype), H).to(q.dtype)
    w = _weights(_finite(q), _finite(k), method, causal, visible, **options)
    o = _unfold(w @ _finite(v).to(w.dtype), H).to(q.dtype)
    vis = visibility(q.shape[-2], k.shape[-2], causal, visible, device=q.device)
    return _NanPolicy.apply(o, q, k, v, _bad_outputs(q, k, v, vis), vis, method)


# --------------------------------------------------------------------------------------------------------
# NaN and Inf: an output (and a gradient) is NaN exactly when it depends on a non-finite input element
# --------------------------------------------------------------------------------------------------------


def _all_finite(*xs) -> bool:
    return bool(torch.stack([torch.isfinite(x).all() for x in xs]).all())


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its non-finite elements replaced by 0 (their gradient through here is 0)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _reach(rows: torch.Tensor, vis: torch.Tensor | None) -> torch.Tensor:
    """``any_i vis_ij & rows_i[..., :]`` over the query rows i: ``rows`` ``[B, H, Lq(, D)]`` -> ``[B, H, Lk(, D)]``
    (non-causal: every key is reached by every row)."""
    r = rows.to(torch.float32)
    flat = r.ndim == 3
    r = r[..., None] if flat else r
    if vis is None:
        out = r.amax(dim=-2, keepdim=True)  # [B, H, 1, D]; broadcast over the keys by the caller
    else:
        out = vis.to(torch.float32).transpose(-1, -2) @ r  # [B, H, Lk, D]: a count of the rows
    out = out > 0
    return out[..., 0] if flat else out


def _gather(keys: torch.Tensor, vis: torch.Tensor | None) -> torch.Tensor:
    """``any_j vis_ij & keys_j`` over the keys j a row sees: ``[B, H, Lk(, D)]`` -> ``[B, H, Lq(, D)]``."""
    k = keys.to(torch.float32)
    flat = k.ndim == 3
    k = k[..., None] if flat else k
    out = (k.amax(dim=-2, keepdim=True) if vis is None else vis.to(torch.float32) @ k) > 0
    return out[..., 0] if flat else out


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all(dim=-1)  # [B, H, L]


def _bad_outputs(q, k, v, causal) -> torch.Tensor:
    """``[B, H, Lq, D]``: o_id depends on q_i, on every key k_j row i sees, and on v_jd of those keys; a row that
    sees no key outputs 0 and depends on nothing.

    ``causal``: True/False, or the visibility (``[Lq, Lk]`` or ``[B, 1, Lq, Lk]``, see :func:`visibility`).
    ``k``, ``v`` may have fewer heads than ``q`` (grouped queries).
    """
    H, Hkv = q.shape[1], k.shape[1]
    vis = _fold_vis(visibility(q.shape[-2], k.shape[-2], causal, device=q.device), H // Hkv)
    bq = _fold(_bad_rows(q), Hkv)  # [B, H_kv, G·Lq]
    if vis is not None:
        bq = bq & vis.any(dim=-1)
    rows = bq | _gather(_bad_rows(k), vis)
    return _unfold(rows[..., None] | _gather(~torch.isfinite(v), vis), H)


def _bad_weights(q, k, method, causal) -> torch.Tensor:
    """``[B, H, Lq, Lk]``: a visible weight w_ij depends on q_i and k_j, and through the normalisation of a
    normalised method on every key of row i. Invisible weights are 0 and depend on nothing."""
    from .methods import REGISTRY

    H, Hkv = q.shape[1], k.shape[1]
    Lq, Lk = q.shape[-2], k.shape[-2]
    vis = _fold_vis(visibility(Lq, Lk, causal, device=q.device), H // Hkv)
    bq, bk = _fold(_bad_rows(q), Hkv), _bad_rows(k)
    if REGISTRY[method].normalised:
        bad = (bq | _gather(bk, vis))[..., None].expand(*bq.shape, Lk)
    else:
        bad = bq[..., None] | bk[..., None, :]
    return _unfold(bad if vis is None else bad & vis, H)


class _NanPolicy(torch.autograd.Function):
    """Forward: the outputs marked ``bad`` (those that depend on a non-finite input) become NaN.

    Backward: the cotangent of a bad output is not sent into the computation (which ran on the finite part of
    the inputs); instead every input element that such an output depends on, where the cotangent is non-zero,
    gets a NaN gradient. The dependency structure is the one of :func:`_bad_outputs` (``v`` given) or
    :func:`_bad_weights` (``v`` is None); ``causal`` may be the visibility tensor (:func:`visibility`), and ``k``,
    ``v`` may have fewer heads than ``q``.
    """

    @staticmethod
    def forward(ctx, out, q, k, v, bad, causal, method):
        ctx.save_for_backward(bad)
        ctx.causal, ctx.method, ctx.has_v = causal, method, v is not None
        ctx.shapes = (q.shape, k.shape, q.dtype, k.dtype, None if v is None else v.dtype)
        return out.masked_fill(bad, float("nan"))

    @staticmethod
    def backward(ctx, g):
        from .methods import REGISTRY

        (bad,) = ctx.saved_tensors
        qs, ks, qd, kd, vd = ctx.shapes
        H, Hkv = qs[1], ks[1]
        vis = _fold_vis(visibility(qs[-2], ks[-2], ctx.causal, device=g.device), H // Hkv)
        hit = _fold(bad & (g != 0), Hkv)  # bad outputs the loss uses (a NaN cotangent counts), rows folded
        rows = hit.any(dim=-1)  # [B, H_kv, G·Lq]: the query rows that reach a used bad output
        if ctx.has_v or REGISTRY[ctx.method].normalised:
            keys = _reach(rows, vis).expand(*ks[:-1])  # every key those rows see
        else:
            keys = hit.any(dim=-2)  # unnormalised weights: w_ij depends on k_j only
        nan = float("nan")
        gq = torch.zeros(qs, dtype=qd, device=g.device).masked_fill(_unfold(rows, H)[..., None], nan)
        gk = torch.zeros(ks, dtype=kd, device=g.device).masked_fill(keys[..., None], nan)
        gv = None
        if ctx.has_v:
            gv = torch.zeros(ks, dtype=vd, device=g.device).masked_fill(_reach(hit, vis).expand(*ks), nan)
        return g.masked_fill(bad, 0), gq, gk, gv, None, None, None
