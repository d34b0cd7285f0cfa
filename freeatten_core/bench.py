"""``python -m freeatten_core bench``: the fused LSSA / LSSAR kernels against SDPA, FlexAttention and the reference.

Times forward, backward and forward+backward (CUDA events, warm-up, median of the repetitions), reports TFLOP/s
with the FlashAttention convention (forward 4·B·H·Lq·Lk·d, ×0.5 when causal; backward 2.5× forward; LSSAR is
counted the same, so its extra key pass shows as lower TFLOP/s) and the peak memory of one forward+backward.
Implementations, all on the same bf16 inputs in one run:

* ``triton``     the fused kernels (``backend="triton"``; q/k normalisation included, as in a model),
* ``sdpa``       PyTorch softmax attention, flash backend (the speed yardstick: every ratio is against it),
* ``flex``       FlexAttention, compiled, with a ``score_mod`` expressing the same method: LSSA in one call
                 (``softmax(log f) = f/Σf``); LSSAR in two calls, the first returning the log-sum ``ln Z``, the
                 second the log-domain re-weighting ``p·ln(N·f/Z − O)``,
* ``reference``  the eager plain-PyTorch specification (materialises ``[L, L]``; runs out of memory first).

Lengths 1K…16K are timed; 32K and 64K only run once for peak memory. Out-of-memory is caught and recorded.
Results go to ``<out>/bench_<device>.json`` (with provenance) and ``<out>/bench_<device>.png``.
``--cpu-smoke`` runs tiny shapes on the CPU (kernels in the Triton interpreter, eager FlexAttention forward
only) in seconds: it checks the plumbing and the JSON/plot, and its timings are not speed claims.

``--decode`` times one decoding step instead: ``--queries`` new tokens (default 1) per sequence against a KV cache
of each of ``--kv-lengths`` (default 1K…64K), with grouped queries (``--heads`` query heads, ``--kv-heads`` key/value
heads; default 32 and 8, head dim 128, batch 4), forward only, no autograd. Implementations: ``triton`` (the
split-key decoding kernel, through ``attention(..., backend="triton")``), ``sdpa`` (softmax, PyTorch SDPA with
``enable_gqa``) and ``reference``. Reported per step: the median time, the peak memory above the inputs, and the
K/V bytes of the cache over the time (GB/s: decoding is bound by reading the cache). Written to
``<out>/decode_<device>.json`` (and ``.png``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

SCHEMA_VERSION = 1
MODES = ("fwd", "bwd", "fwdbwd")
IMPLS = ("triton", "sdpa", "flex", "reference")


def _parse_ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return out


def _parse_count(minimum: int):
    def parse(s: str) -> int:
        try:
            x = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if x < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {x}")
        return x

    return parse


# the defaults of the GPU benchmark and of --cpu-smoke; a flag given on the command line wins over both
DEFAULTS = dict(lengths=[1024, 2048, 4096, 8192, 16384], mem_lengths=[32768, 65536], head_dims=[64, 128], batch=4,
                heads=16, warmup=5, reps=20)
SMOKE = dict(lengths=[64], mem_lengths=[128], head_dims=[32], batch=1, heads=2, warmup=1, reps=2)
DECODE_DEFAULTS = dict(kv_lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536], head_dims=[128], batch=4, heads=32,
                       kv_heads=8, queries=1, warmup=10, reps=50)
DECODE_SMOKE = dict(kv_lengths=[40, 70], head_dims=[32], batch=1, heads=4, kv_heads=2, queries=1, warmup=0, reps=1)
DECODE_IMPLS = ("triton", "sdpa", "reference")


def _parse_list(allowed):
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(allowed)}, got {s!r}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m freeatten_core bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=_parse_ints, default=None, help="sequence lengths to time (default 1K..16K)")
    ap.add_argument("--mem-lengths", type=_parse_ints, default=None,
                    help="lengths run once for peak memory only (default 32K, 64K)")
    ap.add_argument("--head-dims", type=_parse_ints, default=None, help="default 64,128 (--decode: 128)")
    ap.add_argument("--batch", type=_parse_count(1), default=None, help="default 4")
    ap.add_argument("--heads", type=_parse_count(1), default=None, help="default 16 (--decode: 32)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--methods", type=_parse_list(("lssa", "lssar")), default=["lssa", "lssar"])
    ap.add_argument("--impls", type=_parse_list(IMPLS), default=list(IMPLS))
    ap.add_argument("--p", type=float, default=15.0, help="LSSAR power (default 15)")
    ap.add_argument("--offset-rows", type=_parse_count(0), default=3)
    ap.add_argument("--warmup", type=_parse_count(0), default=None, help="default 5 (--decode: 10)")
    ap.add_argument("--reps", type=_parse_count(1), default=None, help="default 20 (--decode: 50)")
    ap.add_argument("--out", type=Path, default=Path("results/bench"), help="output folder (default results/bench)")
    ap.add_argument("--tag", default=None, help="file-name tag (default: derived from the device)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny CPU run (Triton interpreter, eager Flex forward): checks the plumbing in seconds")
    dec = ap.add_argument_group("decoding (--decode)")
    dec.add_argument("--decode", action="store_true",
                     help="time one decoding step (few queries against a KV cache) instead of training shapes")
    dec.add_argument("--kv-lengths", type=_parse_ints, default=None, help="KV cache lengths (default 1K..64K)")
    dec.add_argument("--queries", type=_parse_count(1), default=None,
                     help="new tokens per step, 1..16 (default 1)")
    dec.add_argument("--kv-heads", type=_parse_count(1), default=None,
                     help="key/value heads; must divide --heads (default 8, with 32 query heads)")
    return ap


# --------------------------------------------------------------------------------------------------------
# Implementations: each returns o = f(q, k, v) for q, k, v [B, H, L, D]
# --------------------------------------------------------------------------------------------------------


def _softplus(s):
    import torch

    return s.clamp(min=0) + torch.log1p(torch.exp(-s.abs()))


def flex_lssa_lssar(method: str, Lq: int, Lk: int, D: int, causal: bool, p: float, offset_rows: int,
                    device, compiled: bool):
    """FlexAttention expressing LSSA (one call) or LSSAR (two calls) with a ``score_mod``; returns f(q, k, v).

    LSSA: ``score_mod = ln softplus(c_i·q̂·k̂)``, so flex's softmax gives f/Σf. LSSAR: a first call with the LSSA
    score_mod returns ``lse = ln Z_i``; the second uses ``p·ln(N_i·f·e^{−lse} − O_i)`` (−∞ where that is <= 0),
    whose softmax is ReLU(x)^p/Σ ReLU(x)^p, kept finite by flex's own running max. An exactly uniform LSSAR row
    (no x > 0) gives NaN here; random inputs do not have one.
    """
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    off, ln_d = Lk - Lq, math.log(D)
    flex = flex_attention

    def count(q_idx, dtype):
        if causal:
            return (q_idx + off + 1).to(dtype)
        return torch.full_like(q_idx, Lk).to(dtype)

    def lssa_mod(score, b, h, q_idx, kv_idx):
        n = count(q_idx, score.dtype)
        return torch.log(_softplus(score * (ln_d * torch.log(n))))

    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + off, None, None, Lq, Lk,
                                       device=device)

    def run(q, k, v):
        ct = torch.promote_types(q.dtype, torch.float32)  # normalise in float32 (float64 stays float64)
        qh, kh = F.normalize(q.to(ct), dim=-1).to(q.dtype), F.normalize(k.to(ct), dim=-1).to(k.dtype)
        if method == "lssa":
            return flex(qh, kh, v, score_mod=lssa_mod, block_mask=block_mask, scale=1.0)
        lse = _flex_lse(flex, qh, kh, v, lssa_mod, block_mask)

        def lssar_mod(score, b, h, q_idx, kv_idx):
            n = count(q_idx, score.dtype)
            f = _softplus(score * (ln_d * torch.log(n)))
            x = n * f * torch.exp(-lse[b, h, q_idx]) - (n > offset_rows).to(score.dtype)
            return torch.where(x > 0, p * torch.log(x.clamp(min=1e-30)), -float("inf"))

        return flex(qh, kh, v, score_mod=lssar_mod, block_mask=block_mask, scale=1.0)

    # compile the whole function (normalisation and both calls): the LSSAR score_mod is a fresh closure over
    # this call's lse, which a compiled flex_attention alone would see as a new function on every call
    return torch.compile(run, dynamic=False) if compiled else run


def _flex_lse(flex, q, k, v, score_mod, block_mask):
    """ln Z of a flex call (``return_aux=AuxRequest(lse=True)`` in newer torch, ``return_lse`` before)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0, return_lse=True)[1]
    return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0, return_aux=AuxRequest(lse=True))[1].lse


def make_impl(impl: str, method: str, L: int, D: int, causal: bool, p: float, offset_rows: int, device,
              smoke: bool):
    """(f(q, k, v), label) for one implementation."""
    import torch.nn.functional as F

    from freeatten_core.attention import api

    opts = {"p": p, "offset_rows": offset_rows} if method == "lssar" else {}
    if impl == "triton":
        return (lambda q, k, v: api.attention(q, k, v, method=method, causal=causal, backend="triton", **opts))
    if impl == "reference":
        return (lambda q, k, v: api.attention(q, k, v, method=method, causal=causal, backend="reference", **opts))
    if impl == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.MATH if smoke else SDPBackend.FLASH_ATTENTION

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if impl == "flex":
        return flex_lssa_lssar(method, L, L, D, causal, p, offset_rows, device, compiled=not smoke)
    raise ValueError(f"unknown implementation {impl!r}")


# --------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _time_ms(fn, warmup: int, reps: int, cuda: bool) -> float:
    """Median wall time of fn() in ms: CUDA events on a GPU, perf_counter on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fa_flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool, mode: str) -> float:
    """FlashAttention FLOP convention: forward 4·B·H·Lq·Lk·d (×0.5 causal), backward 2.5×, fwd+bwd 3.5×."""
    fwd = 4.0 * B * H * Lq * Lk * D * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[mode]


def measure(fn, q, k, v, do, modes, warmup, reps, cuda, timed=True) -> dict:
    """Times of each mode (ms) and the peak memory (bytes above the inputs) of one forward+backward."""
    import torch

    res = {"status": "ok", "ms": {}, "peak_mem_bytes": None, "error": None}
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        o = fn(q, k, v)
        o.backward(do)
        if cuda:
            torch.cuda.synchronize()
            res["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated() - base)
        del o
        q.grad = k.grad = v.grad = None
        if not timed:
            return res
        for mode in modes:
            if mode == "fwd":
                res["ms"][mode] = _time_ms(lambda: fn(q, k, v), warmup, reps, cuda)
            elif mode == "fwdbwd":
                res["ms"][mode] = _time_ms(lambda: fn(q, k, v).backward(do), warmup, reps, cuda)
            else:  # bwd alone: keep one graph and run its backward again (as the Triton tutorial does)
                o = fn(q, k, v)
                res["ms"][mode] = _time_ms(lambda: o.backward(do, retain_graph=True), warmup, reps, cuda)
                del o
            q.grad = k.grad = v.grad = None
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        res["status"] = "oom" if _is_oom(e) else "error"
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        res["ms"] = {}
        q.grad = k.grad = v.grad = None
        if cuda:
            torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------------------------------------
# Provenance, output
# --------------------------------------------------------------------------------------------------------


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:60] or "device"


def ratios(results: list[dict]) -> list[dict]:
    """fwd+bwd time of every (method, impl) over SDPA's at the same (D, L): the speed targets of the kernels are read here."""
    sdpa = {(r["D"], r["L"]): r["ms"].get("fwdbwd") for r in results if r["impl"] == "sdpa" and r["status"] == "ok"}
    out = []
    for r in results:
        base = sdpa.get((r["D"], r["L"]))
        t = r["ms"].get("fwdbwd")
        if r["impl"] != "sdpa" and base and t:
            out.append({"method": r["method"], "impl": r["impl"], "D": r["D"], "L": r["L"],
                        "fwdbwd_over_sdpa": t / base})
    return out


def _time_memory_figure(res: list[dict]):
    """(pyplot, head dims, figure, axes): a 2 × (head dims) grid, time above and peak memory below, off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["D"] for r in res})
    fig, axes = plt.subplots(2, len(dims), figsize=(5.5 * len(dims), 7.5), squeeze=False)
    return plt, dims, fig, axes


def _finish_time_memory_figure(plt, fig, axes, dims, data, path: Path, xlabel: str, ylabels, log_memory: bool,
                               head: str) -> None:
    """Axes, titles and the provenance line of a :func:`_time_memory_figure`, then the PNG written atomically."""
    from .atomic import atomic_write

    for col, D in enumerate(dims):
        for row, ylabel in enumerate(ylabels):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            if row == 0 or log_memory:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[0, col].set_title(f"head dim {D}")
        axes[0, col].legend(fontsize=7)
    c, prov = data["config"], data["provenance"]
    fig.suptitle(f"{prov['device']} · {c['dtype']} · {head}\n{data['kind']} · torch {prov['torch']} · "
                 f"triton {prov['triton']} · {(prov['git_commit'] or '?')[:8]} · {prov['date_utc']}", fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def plot(data: dict, path: Path) -> None:
    """fwd+bwd time and peak memory against length, one column per head dim."""
    res = data["results"]
    plt, dims, fig, axes = _time_memory_figure(res)
    series = sorted({(r["impl"], r["method"]) for r in res})
    for col, D in enumerate(dims):
        for impl, method in series:
            label = "sdpa (softmax)" if impl == "sdpa" else f"{impl} {method}"
            rows = sorted((r for r in res if r["D"] == D and r["impl"] == impl and r["method"] == method),
                          key=lambda r: r["L"])
            t = [(r["L"], r["ms"]["fwdbwd"]) for r in rows if r["ms"].get("fwdbwd")]
            m = [(r["L"], r["peak_mem_bytes"] / 2**30) for r in rows if r["peak_mem_bytes"]]
            style = "--" if impl == "sdpa" else "-"
            if t:
                axes[0, col].plot(*zip(*t), style, marker="o", label=label)
            if m:
                axes[1, col].plot(*zip(*m), style, marker="o", label=label)
            ooms = [r["L"] for r in rows if r["status"] == "oom"]
            if ooms:
                axes[1, col].scatter(ooms, [0] * len(ooms), marker="x", color="red")
    c = data["config"]
    _finish_time_memory_figure(
        plt, fig, axes, dims, data, path, "sequence length",
        ("fwd+bwd time (ms, median)", "peak memory of fwd+bwd (GiB); x = OOM"), log_memory=False,
        head=f"{'causal' if c['causal'] else 'full'} · B={c['batch']} H={c['heads']}")


def check_decode_args(args, argv) -> None:
    """The --decode flags checked against each other (ValueError naming the problem); before any work."""
    from .attention.api import DECODE_MAX_QUERIES

    if not args.decode:
        given = [f for f in ("--kv-lengths", "--queries", "--kv-heads") if any(a.split("=")[0] == f for a in argv)]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --decode")
        return
    for flag in ("--lengths", "--mem-lengths"):
        if any(a.split("=")[0] == flag for a in argv):
            raise ValueError(f"{flag} does not apply with --decode (use --kv-lengths)")
    bad = [i for i in args.impls if i not in DECODE_IMPLS]
    if bad:
        raise ValueError(f"--decode times the implementations {', '.join(DECODE_IMPLS)}; not {', '.join(bad)}")
    if args.queries > DECODE_MAX_QUERIES:
        raise ValueError(f"--queries must be at most {DECODE_MAX_QUERIES} (the decoding kernel's limit), got "
                         f"{args.queries}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--kv-heads must divide --heads (grouped-query attention), got --heads {args.heads} and "
                         f"--kv-heads {args.kv_heads}")
    if min(args.kv_lengths) < args.queries:
        raise ValueError(f"every --kv-lengths value must be >= --queries ({args.queries}): the new tokens are the "
                         f"last positions of the cache, got {min(args.kv_lengths)}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.decode:
        defaults = DECODE_SMOKE if args.cpu_smoke else DECODE_DEFAULTS
        if not any(a.split("=")[0] == "--impls" for a in argv):
            args.impls = list(DECODE_IMPLS)
    else:
        defaults = SMOKE if args.cpu_smoke else DEFAULTS
    for name, value in defaults.items():  # tiny shapes for --cpu-smoke
        if getattr(args, name) is None:
            setattr(args, name, value)
    from . import atomic
    from .attention.methods import resolve

    try:  # every value and the output folder checked before any work
        check_decode_args(args, argv)
        resolve("lssar", {"p": args.p, "offset_rows": args.offset_rows})
        atomic.check_output_dir(args.out, "--out")
        atomic.remove_stale_temporaries(args.out)  # of a killed earlier run
        if args.tag is not None and (not args.tag or "/" in args.tag or args.tag in (".", "..")):
            raise ValueError(f"--tag must be a plain file-name part, got {args.tag!r}")
    except ValueError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2

    import torch

    from .provenance import provenance as _provenance

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("bench: no CUDA device; run on a GPU, or use --cpu-smoke for a tiny CPU check of the plumbing",
              file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}), " \
                                                             f"Triton interpreter"
    if args.decode:
        return decode_main(args, argv, device, dtype, device_name, cuda)
    if args.cpu_smoke:
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    else:  # one compiled FlexAttention per (method, head dim, length): keep them all instead of falling back
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 512))

    results = []
    B, H = args.batch, args.heads
    plan = [(L, True) for L in args.lengths] + [(L, False) for L in args.mem_lengths]
    for D in args.head_dims:
        for L, timed in plan:
            g = torch.Generator(device=device).manual_seed(L * 1000 + D)
            try:
                q, k, v, do = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(4))
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                for impl in args.impls:
                    results.append(dict(impl=impl, method="softmax", D=D, L=L, timed=timed, status="oom", ms={},
                                        tflops={}, peak_mem_bytes=None, error="inputs do not fit"))
                continue
            for t in (q, k, v):
                t.requires_grad_(True)
            for impl in args.impls:
                methods = ["softmax"] if impl == "sdpa" else args.methods
                for method in methods:
                    if args.cpu_smoke and impl == "flex":
                        # FlexAttention has no CPU backward: check its forward only (eager, no compile)
                        qq, kk, vv = q.detach(), k.detach(), v.detach()
                        fn = make_impl(impl, method, L, D, args.causal, args.p, args.offset_rows, device, True)
                        r = {"status": "ok", "ms": {}, "peak_mem_bytes": None, "error": None}
                        if timed:
                            with torch.no_grad():
                                r["ms"]["fwd"] = _time_ms(lambda: fn(qq, kk, vv), args.warmup, args.reps, False)
                    else:
                        try:
                            fn = make_impl(impl, method, L, D, args.causal, args.p, args.offset_rows, device,
                                           args.cpu_smoke)
                        except Exception as e:  # noqa: BLE001
                            r = {"status": "error", "ms": {}, "peak_mem_bytes": None,
                                 "error": f"{type(e).__name__}: {e}"}
                        else:
                            r = measure(fn, q, k, v, do, MODES, args.warmup, args.reps, cuda, timed=timed)
                    tflops = {m: fa_flops(B, H, L, L, D, args.causal, m) / (ms * 1e-3) / 1e12
                              for m, ms in r["ms"].items()}
                    results.append(dict(impl=impl, method=method, D=D, L=L, timed=timed, **r, tflops=tflops))
                    msg = " ".join(f"{m} {ms:8.3f} ms {tflops[m]:6.1f} TF/s" for m, ms in r["ms"].items())
                    mem = f"{r['peak_mem_bytes'] / 2**30:.2f} GiB" if r["peak_mem_bytes"] else "-"
                    print(f"D={D:<4d} L={L:<6d} {impl:<9s} {method:<7s} {r['status']:<5s} {msg} peak {mem}"
                          + (f"  [{r['error']}]" if r["error"] else ""), flush=True)
            del q, k, v, do
            if cuda:
                torch.cuda.empty_cache()

    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": "cpu-smoke (Triton interpreter: not a speed measurement)" if args.cpu_smoke else "gpu-benchmark",
        "provenance": {**_provenance(" ".join(["python -m freeatten_core bench", *map(shlex.quote, argv)]), device),
                       "device": device_name},
        "config": {"batch": B, "heads": H, "dtype": args.dtype, "causal": args.causal, "lengths": args.lengths,
                   "mem_lengths": args.mem_lengths, "head_dims": args.head_dims, "methods": args.methods,
                   "impls": args.impls, "p": args.p, "offset_rows": args.offset_rows, "warmup": args.warmup,
                   "reps": args.reps,
                   "flop_convention": "FlashAttention: fwd 4*B*H*Lq*Lk*D (x0.5 causal), bwd 2.5x fwd, "
                                      "fwdbwd 3.5x fwd; LSSAR counted the same"},
        "results": results,
    }
    data["ratios"] = ratios(results)
    tag = args.tag or ("cpu-smoke" if args.cpu_smoke else _slug(device_name))
    json_path = args.out / f"bench_{tag}.json"
    atomic.write_json(json_path, data)
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = args.out / f"bench_{tag}.png"
        plot(data, png)
        print(f"wrote {png}")
    for r in data["ratios"]:
        if r["L"] == 8192 or args.cpu_smoke:
            print(f"ratio fwd+bwd / sdpa  D={r['D']} L={r['L']} {r['impl']} {r['method']}: "
                  f"{r['fwdbwd_over_sdpa']:.2f}")
    return 0


# --------------------------------------------------------------------------------------------------------
# Decoding: one step of --queries new tokens against a KV cache, forward only
# --------------------------------------------------------------------------------------------------------


def make_decode_impl(impl: str, method: str, p: float, offset_rows: int):
    """f(q, k, v) for one decoding step: q [B, H, Lq, D], k/v [B, H_kv, Lk, D] (queries at the last positions)."""
    from freeatten_core.attention import api

    opts = {"p": p, "offset_rows": offset_rows} if method == "lssar" else {}
    if impl == "triton":  # Lq <= 16 without autograd: the split-key decoding kernel
        return lambda q, k, v: api.attention(q, k, v, method=method, causal=True, backend="triton", **opts)
    if impl == "reference":
        return lambda q, k, v: api.attention(q, k, v, method=method, causal=True, backend="reference", **opts)
    if impl == "sdpa":
        return lambda q, k, v: api.sdpa_softmax(q, k, v, True)
    raise ValueError(f"unknown decoding implementation {impl!r}")


def measure_decode(fn, q, k, v, warmup: int, reps: int, cuda: bool) -> dict:
    """The median time of one step (ms) and its peak memory above the inputs (bytes), without autograd."""
    import torch

    res = {"status": "ok", "ms": None, "peak_mem_bytes": None, "error": None}
    try:
        with torch.no_grad():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            o = fn(q, k, v)
            if cuda:
                torch.cuda.synchronize()
                res["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated() - base)
            del o
            res["ms"] = _time_ms(lambda: fn(q, k, v), warmup, reps, cuda)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
        res["status"] = "oom" if _is_oom(e) else "error"
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if cuda:
            torch.cuda.empty_cache()
    return res


def plot_decode(data: dict, path: Path) -> None:
    """Step time and peak memory against the KV length, one column per head dim."""
    res = data["results"]
    plt, dims, fig, axes = _time_memory_figure(res)
    for col, D in enumerate(dims):
        for impl, method in sorted({(r["impl"], r["method"]) for r in res}):
            rows = sorted((r for r in res if r["D"] == D and r["impl"] == impl and r["method"] == method),
                          key=lambda r: r["Lk"])
            t = [(r["Lk"], r["ms"]) for r in rows if r["ms"]]
            m = [(r["Lk"], r["peak_mem_bytes"] / 2**20) for r in rows if r["peak_mem_bytes"]]
            label, style = ("sdpa (softmax)", "--") if impl == "sdpa" else (f"{impl} {method}", "-")
            if t:
                axes[0, col].plot(*zip(*t), style, marker="o", label=label)
            if m:
                axes[1, col].plot(*zip(*m), style, marker="o", label=label)
    c = data["config"]
    _finish_time_memory_figure(
        plt, fig, axes, dims, data, path, "KV cache length",
        ("decoding step (ms, median)", "peak memory of a step (MiB)"), log_memory=True,
        head=f"B={c['batch']} H={c['heads']} H_kv={c['kv_heads']} Lq={c['queries']}")


def decode_main(args, argv, device, dtype, device_name, cuda) -> int:
    """``bench --decode``: every (head dim, KV length, implementation, method) once; JSON (+ plot) in --out."""
    import torch

    from . import atomic
    from .provenance import provenance as _provenance

    B, H, Hkv, Lq = args.batch, args.heads, args.kv_heads, args.queries
    elem = torch.finfo(dtype).bits // 8
    results = []
    for D in args.head_dims:
        for Lk in args.kv_lengths:
            g = torch.Generator(device=device).manual_seed(Lk * 1000 + D)
            try:
                q = torch.randn(B, H, Lq, D, device=device, dtype=dtype, generator=g)
                k, v = (torch.randn(B, Hkv, Lk, D, device=device, dtype=dtype, generator=g) for _ in range(2))
            except Exception as e:  # noqa: BLE001
                if not _is_oom(e):
                    raise
                results += [dict(impl=i, method="-", D=D, Lk=Lk, status="oom", ms=None, peak_mem_bytes=None,
                                 kv_gb_per_s=None, error="inputs do not fit") for i in args.impls]
                continue
            kv_bytes = 2 * B * Hkv * Lk * D * elem
            for impl in args.impls:
                for method in (["softmax"] if impl == "sdpa" else args.methods):
                    r = measure_decode(make_decode_impl(impl, method, args.p, args.offset_rows), q, k, v,
                                       args.warmup, args.reps, cuda)
                    gbps = kv_bytes / (r["ms"] * 1e-3) / 1e9 if r["ms"] else None
                    results.append(dict(impl=impl, method=method, D=D, Lk=Lk, **r, kv_gb_per_s=gbps))
                    mem = f"{r['peak_mem_bytes'] / 2**20:.1f} MiB" if r["peak_mem_bytes"] else "-"
                    msg = f"{r['ms']:8.4f} ms {gbps:7.1f} GB/s" if r["ms"] else ""
                    print(f"decode D={D:<4d} Lk={Lk:<6d} {impl:<9s} {method:<7s} {r['status']:<5s} {msg} peak {mem}"
                          + (f"  [{r['error']}]" if r["error"] else ""), flush=True)
            del q, k, v
            if cuda:
                torch.cuda.empty_cache()
    sdpa = {(r["D"], r["Lk"]): r["ms"] for r in results if r["impl"] == "sdpa" and r["ms"]}
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": ("decode cpu-smoke (Triton interpreter: not a speed measurement)" if args.cpu_smoke
                 else "decode gpu-benchmark"),
        "provenance": {**_provenance(" ".join(["python -m freeatten_core bench", *map(shlex.quote, argv)]), device),
                       "device": device_name},
        "config": {"batch": B, "heads": H, "kv_heads": Hkv, "queries": Lq, "dtype": args.dtype,
                   "kv_lengths": args.kv_lengths, "head_dims": args.head_dims, "methods": args.methods,
                   "impls": args.impls, "p": args.p, "offset_rows": args.offset_rows, "warmup": args.warmup,
                   "reps": args.reps, "causal": True,
                   "kv_gb_per_s": "bytes of K and V in the cache (read once) over the step time"},
        "results": results,
        "ratios": [{"method": r["method"], "impl": r["impl"], "D": r["D"], "Lk": r["Lk"],
                    "step_over_sdpa": r["ms"] / sdpa[(r["D"], r["Lk"])]}
                   for r in results if r["impl"] != "sdpa" and r["ms"] and sdpa.get((r["D"], r["Lk"]))],
    }
    tag = args.tag or ("cpu-smoke" if args.cpu_smoke else _slug(device_name))
    json_path = args.out / f"decode_{tag}.json"
    atomic.write_json(json_path, data)
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = args.out / f"decode_{tag}.png"
        plot_decode(data, png)
        print(f"wrote {png}")
    for r in data["ratios"]:
        print(f"ratio step / sdpa  D={r['D']} Lk={r['Lk']} {r['impl']} {r['method']}: {r['step_over_sdpa']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------------------------------------------------
# Whole-model training throughput (tokens/s), e.g. fused LSSAR against SDPA softmax on a GPU
# ------------------------------------------------------------------------------------------------------------

def measure_throughput(model_cfg, batch_size: int, steps: int = 20, warmup: int = 5, device="auto",
                       dtype: str = "auto", compile: bool = False, seed: int = 0) -> dict:
    """Training tokens per second (forward + backward + AdamW) on random tokens of length ``block_size``.

    The GPU comparison is ``lssar`` with ``backend="triton"`` against ``softmax`` with ``backend="auto"``, which
    on CUDA runs PyTorch SDPA (flash) through :func:`freeatten_core.attention`; same model otherwise.
    """
    import torch

    from .model import GPT
    from .runtime import autocast_for, resolve_device

    device = resolve_device(device)
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(device)
    opt = model.configure_optimizer(1e-4, 0.1, device_type=device.type)
    fwd = torch.compile(model) if compile else model
    L = model_cfg.block_size
    x = torch.randint(0, model_cfg.vocab_size, (batch_size, L + 1), device=device)

    def step():
        with autocast_for(device, dtype):
            _, loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    sdpa = model_cfg.attention == "softmax" and model_cfg.backend == "auto" and device.type == "cuda"
    return {"attention": model_cfg.attention, "backend": "sdpa" if sdpa else model_cfg.backend,
            "batch_size": batch_size, "block_size": L, "params": model.num_params(),
            "ms_per_step": 1000 * dt, "tokens_per_s": batch_size * L / dt, "device": str(device), "dtype": dtype,
            "compile": compile}
