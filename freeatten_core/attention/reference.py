"""Every attention method in plain PyTorch: the specification.

Shapes: ``q`` is ``[B, H, Lq, D]``, ``k`` and ``v`` are ``[B, H, Lk, D]``. Query row ``i`` (0-based here,
1-based in the paper) sees ``N_i`` keys:

* non-causal: all ``Lk`` keys, ``N_i = Lk``;
* causal: queries are aligned to the *last* ``Lq`` keys (bottom-right, what incremental decoding needs), so
  query ``i`` sees keys ``j <= i + Lk - Lq`` and ``N_i = Lk - Lq + i + 1``.

Everything here materialises the ``[Lq, Lk]`` weight matrix: it is short, readable and exact, not fast.
Half-precision inputs are computed in float32 and the result is cast back; float64 inputs stay float64, so a
float64 call *is* a float64 transcription of the formulas. No epsilon enters any normalisation (see the
"Decisions" page of the book): every division is by a quantity that is provably positive, or guarded by an
exact case split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def lss_scores(q: torch.Tensor, k: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """LSSA scores s_ij = ln(d)·ln(N_i)·q̂_i·k̂_j with q, k on the unit sphere (no 1/√d).

    A zero vector has no direction; ``F.normalize`` maps it to 0 (its 1e-12 clamp changes nothing for any
    vector of norm above 1e-12).
    """
    qh = F.normalize(q, dim=-1)
    kh = F.normalize(k, dim=-1)
    return length_scale(N, q.shape[-1])[:, None] * (qh @ kh.transpose(-1, -2))


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
    guarded by an exact case split (and stays NaN-free in backward).
    """
    Z = f.sum(dim=-1, keepdim=True)
    pos = Z > 0
    return torch.where(pos, f / torch.where(pos, Z, torch.ones_like(Z)), torch.zeros_like(f))


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
# The methods: each maps (q, k, N, mask, options) to the weight matrix [B, H, Lq, Lk]
# --------------------------------------------------------------------------------------------------------


def _softmax(q, k, N, mask):
    return masked_softmax(dot_scores(q, k), mask)


def _ssmax(q, k, N, mask, s=1.0):
    # Scalable-Softmax: softmax(s·ln(N_i)·q·k/√d); s is a scalar or one value per head.
    s = torch.as_tensor(s, dtype=q.dtype, device=q.device)
    s = s.reshape(1, -1, 1, 1) if s.ndim == 1 else s
    return masked_softmax(s * torch.log(N)[:, None] * dot_scores(q, k), mask)


def _lssa(q, k, N, mask):
    f = mask_fill(softplus(lss_scores(q, k, N)), mask, 0.0)
    return l1_normalise(f)


def _lssar(q, k, N, mask, p=15.0, offset_rows=3):
    D = q.shape[-1]
    return reweight(_lssa(q, k, N, mask), N, p, offset_rows, length_scale(N, D)[:, None], D)


def _dot_score_bound(q, k):
    """A bound on |q_i·k_j|/√d per row, ``[B, H, Lq, 1]`` (Cauchy–Schwarz)."""
    kmax = k.norm(dim=-1).amax(dim=-1, keepdim=True)[..., None]
    return (q.norm(dim=-1, keepdim=True) * kmax / math.sqrt(q.shape[-1])).detach()


def _softmax_reweight(q, k, N, mask, p=15.0, offset_rows=3):
    return reweight(_softmax(q, k, N, mask), N, p, offset_rows, _dot_score_bound(q, k), q.shape[-1])


def _sigmoid_l1_reweight(q, k, N, mask, p=15.0, offset_rows=3):
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


WEIGHT_FUNCTIONS = {
    "softmax": _softmax,
    "lssa": _lssa,
    "lssar": _lssar,
    "softmax_reweight": _softmax_reweight,
    "sigmoid_l1_reweight": _sigmoid_l1_reweight,
    "sigmoid": _sigmoid,
    "relu": _relu,
    "ssmax": _ssmax,
    "linear": _linear,
    **{f"{m}_{'l1' if l1 else 'nol1'}": _phi(m, l1) for m in POSITIVITY_MAPS for l1 in (True, False)},
}


def attention_weights(q: torch.Tensor, k: torch.Tensor, method: str, causal: bool, **options) -> torch.Tensor:
    """The weight matrix ``[B, H, Lq, Lk]`` of ``method``, computed in ``compute_dtype(q.dtype)``.

    No input checking here: :func:`freeatten_core.attention_weights` validates and then calls this.
    """
    ct = compute_dtype(q.dtype)
    q, k = q.to(ct), k.to(ct)
    Lq, Lk = q.shape[-2], k.shape[-2]
    N = row_counts(Lq, Lk, causal, device=q.device, dtype=ct)
    mask = visible_mask(Lq, Lk, causal, device=q.device)
    return WEIGHT_FUNCTIONS[method](q, k, N, mask, **options)


def attention(q, k, v, method: str, causal: bool, **options) -> torch.Tensor:
    """o = W·v with W from :func:`attention_weights`; the result has the dtype of ``q``."""
    w = attention_weights(q, k, method, causal, **options)
    return (w @ v.to(w.dtype)).to(q.dtype)
