"""What computing LSSAR's power y^p in half precision would cost in accuracy (the book's decisions page).

The re-weighting pass forms u = y^15 per attention element with five float32 products. Packed half-precision
multiplies (HMUL2) would do two elements per instruction, but round every product. This measures that rounding
alone, in plain PyTorch, for each input dtype: y is taken exact (float64, from the reference's LSSA weights of
random inputs), the power is formed in float32, float16, bfloat16, or y^3 in float32 and the rest in float16,
and the result is rounded to the dtype of the P·V operand, as the kernels round it; the output o = Σ P v / Σ P
(float64 from there on) is compared with the exact one. Error: RMS(o − o_exact) / RMS(o_exact), per seed.

    .venv/bin/python scripts/measure_half_power.py            # writes results/kernels/half_power.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from freeatten_core.atomic import write_json  # noqa: E402
from freeatten_core.attention import reference  # noqa: E402
from freeatten_core.provenance import provenance  # noqa: E402


def power15(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y^15 by the kernels' addition chain (y², y³, y⁶, y¹², y¹⁵) with every product rounded to ``dtype``."""
    y = y.to(dtype)
    y2 = y * y
    y3 = y2 * y
    y6 = y3 * y3
    return (y6 * y6) * y3


def variants(y: torch.Tensor) -> dict:
    """u = y^15 (y ≥ 0, float64) as each way of computing it gives it (before the operand rounding)."""
    y3 = (y.float() * y.float() * y.float()).half()
    return {
        "float32": power15(y, torch.float32),
        "float16": power15(y, torch.float16),
        "bfloat16": power15(y, torch.bfloat16),
        "y^3 float32, then float16": (y3 * y3) * (y3 * y3) * y3,
    }


def measure(dtype: torch.dtype, L: int, D: int, heads: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, L, D, generator=g).to(dtype).double() for _ in range(3))
    N = reference.row_counts(L, L, True, dtype=torch.float64)
    A = reference._lssa(q, k, N, reference.visible_mask(L, L, True))  # exact LSSA weights (float64)
    x = N[:, None] * A - (N[:, None] > 3).double()  # the paper's offset rows: the first three rows keep O = 0
    y = torch.relu(x) / x.amax(-1, keepdim=True)  # the kernels' max-normalised y ∈ [0, 1]
    exact = y ** 15
    o_exact = (exact @ v) / exact.sum(-1, keepdim=True)
    out = {}
    for name, u in variants(y).items():
        P = u.to(dtype).double()  # the P·V operand; the row sum is taken of the same rounded values
        o = (P @ v) / P.sum(-1, keepdim=True)
        out[name] = ((o - o_exact).square().mean().sqrt() / o_exact.square().mean().sqrt()).item()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results/kernels/half_power.json"))
    a = ap.parse_args(argv)
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        per_seed = [measure(dtype, a.length, a.head_dim, a.heads, s) for s in range(a.seeds)]
        for name in per_seed[0]:
            errs = [r[name] for r in per_seed]
            rows.append({"input_dtype": str(dtype).split(".")[-1], "power_in": name, "rel_err_per_seed": errs,
                         "rel_err_mean": statistics.mean(errs), "rel_err_sd": statistics.stdev(errs)})
            print(f"{rows[-1]['input_dtype']:<9} power in {name:<27} output error "
                  f"{rows[-1]['rel_err_mean']:.2e} ± {rows[-1]['rel_err_sd']:.1e} (seeds {a.seeds})")
    write_json(a.out, {"rows": rows, "length": a.length, "head_dim": a.head_dim, "heads": a.heads, "causal": True,
                       "p": 15, "provenance": provenance(" ".join(["scripts/measure_half_power.py", *(argv or sys.argv[1:])]))})
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
