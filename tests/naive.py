"""An independent float64 transcription of every method, one query row at a time, in NumPy.

Written straight from the formulas of the paper (and the method table), deliberately sharing
no code with ``freeatten_core``: a loop over rows, literal formulas (``ReLU(x)**p`` without any max trick,
which float64 holds for the lengths used in the tests).
"""

from __future__ import annotations

import math

import numpy as np


def _softplus(x):
    return np.logaddexp(x, 0.0)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _softmax(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def _reweight(a, n, p, offset_rows, score_bound, d):
    o = 0.0 if n <= offset_rows else 1.0
    x = n * a - o
    # no weight above uniform beyond float64 rounding (scores of size <= score_bound from d-term dot products)
    if x.max() <= np.finfo(np.float64).eps * (8 + 2 * score_bound * d + n / 16):
        return a
    r = np.maximum(x, 0.0) ** p
    return r / r.sum()


def row_weights(qi, K, n, method, opts):
    """Weights of one query row ``qi`` [D] over its visible keys ``K`` [n, D]."""
    d = qi.shape[0]
    dot = K @ qi / math.sqrt(d)
    cos = (K / np.linalg.norm(K, axis=1, keepdims=True)) @ (qi / np.linalg.norm(qi))
    c = math.log(d) * math.log(n)
    p, off = opts.get("p", 15.0), opts.get("offset_rows", 3)
    if method in ("softmax", "exp_l1"):
        return _softmax(dot)
    if method == "ssmax":
        return _softmax(opts.get("s", 1.0) * math.log(n) * dot)
    if method == "softmax_qknorm":
        return _softmax(opts.get("s", 10.0) * cos)
    if method == "softmax_window":  # the last `window` of the keys the row sees
        w = np.zeros(n)
        last = min(n, opts.get("window", 256))
        w[n - last:] = _softmax(dot[n - last:])
        return w
    if method == "lssa":
        f = _softplus(c * cos)
        return f / f.sum()
    if method == "lssar":
        f = _softplus(c * cos)
        return _reweight(f / f.sum(), n, p, off, c, d)
    if method == "softmax_reweight":
        bound = np.linalg.norm(qi) * np.linalg.norm(K, axis=1).max() / math.sqrt(d)
        return _reweight(_softmax(dot), n, p, off, bound, d)
    if method == "sigmoid_l1_reweight":
        f = _sigmoid(c * cos)
        return _reweight(f / f.sum(), n, p, off, c, d)
    if method == "sigmoid":
        return _sigmoid(dot - math.log(n))
    if method == "relu":
        return np.maximum(dot, 0.0) / n
    if method == "linear":
        w = _elu1(K) @ _elu1(qi)
        return w / w.sum()
    phi, norm = method.rsplit("_", 1)
    f = {"exp": np.exp, "softplus": _softplus, "relu": lambda x: np.maximum(x, 0.0), "sigmoid": _sigmoid}[phi](dot)
    if norm == "nol1":
        return f
    return f / f.sum() if f.sum() > 0 else np.zeros_like(f)


def weights(q, k, method, causal, **opts):
    """[B, H, Lq, Lk] float64 weights from NumPy arrays q [B, H, Lq, D], k [B, H, Lk, D]."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    W = np.zeros((B, H, Lq, Lk))
    for b in range(B):
        for h in range(H):
            hopts = dict(opts)
            if "s" in opts and np.ndim(opts["s"]) == 1:
                hopts["s"] = float(opts["s"][h])
            for i in range(Lq):
                n = Lk - Lq + i + 1 if causal else Lk
                W[b, h, i, :n] = row_weights(q[b, h, i], k[b, h, :n], n, method, hopts)
    return W
