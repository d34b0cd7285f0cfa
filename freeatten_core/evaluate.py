"""Length-extrapolation evaluation: validation loss at k·L for k = 1, 2, 4, 8, 16 (L = the training length).

Two numbers per length, because they answer different questions:

* ``loss_window``: the mean loss over the whole window of k·L tokens, what most papers report. It flatters
  long windows: the first L positions of every window are in-distribution, and a model that fails beyond L is
  still averaged with them.
* ``loss_last``: the mean loss over the last L tokens of the window, i.e. only positions (k-1)·L … k·L - 1,
  the ones that need extrapolation. At k = 1 both numbers are the same.

plus ``loss_by_position`` (the mean over windows at every position), for the plots.

Python::

    from freeatten_core.evaluate import evaluate_checkpoint
    res = evaluate_checkpoint("runs/lssa", method="lssar", options={"p": 15})   # LSSA, re-weighted at inference

Command line::

    python -m freeatten_core evaluate --checkpoint runs/lssa --method lssar --option p=15 --out res.json
"""

from __future__ import annotations

import argparse
import math
import numbers
import sys
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .provenance import provenance
from .train import autocast_for, load_model, parse_options, resolve_device


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_factors(factors) -> tuple:
    if isinstance(factors, (str, bytes)) or not hasattr(factors, "__iter__"):
        raise ValueError(f"factors must be a list of integers >= 1, got {factors!r}")
    factors = tuple(factors)
    if not factors:
        raise ValueError("factors must not be empty")
    return tuple(_check_count("each length factor", k) for k in factors)


@torch.no_grad()
def evaluate_model(model, val_docs, block_size: int, factors=(1, 2, 4, 8, 16), n_windows: int = 16,
                   batch_size: int = 16, device=None, dtype: str = "auto") -> dict:
    """Loss at each length k·``block_size``; ``val_docs`` is a list of token arrays (whole documents)."""
    from .data import val_windows

    device = next(model.parameters()).device if device is None else torch.device(device)
    factors = _check_factors(factors)
    n_windows, batch_size = _check_count("n_windows", n_windows), _check_count("batch_size", batch_size)
    model.eval()
    out = {}
    for k in factors:
        length = int(k) * block_size
        windows = torch.from_numpy(val_windows(val_docs, length, n_windows))  # [n, length + 1]
        per_pos = torch.zeros(length, dtype=torch.float64)
        for i in range(0, len(windows), batch_size):
            w = windows[i:i + batch_size].to(device)
            with autocast_for(device, dtype):
                _, loss = model(w[:, :-1], w[:, 1:], reduction="none")  # [b, length]
            per_pos += loss.double().sum(0).cpu()
        per_pos /= len(windows)
        bad = (~torch.isfinite(per_pos)).nonzero().flatten()
        if len(bad):
            raise FloatingPointError(f"the loss at {k}x ({length} tokens) is {float(per_pos[bad[0]])} at position "
                                     f"{int(bad[0])} ({len(bad)} of {length} positions are not finite): the model "
                                     f"or its attention produces NaN/Inf on these inputs")
        out[str(k)] = {
            "factor": int(k), "length": length, "windows": len(windows),
            "loss_window": float(per_pos.mean()),
            "loss_last": float(per_pos[-block_size:].mean()),
            "loss_by_position": [round(float(x), 5) for x in per_pos],
        }
    return out


def evaluate_checkpoint(checkpoint, method: str | None = None, options: dict | None = None, factors=None,
                        n_windows: int | None = None, batch_size: int | None = None, device="auto",
                        backend: str | None = None, data=None, command: str | None = None) -> dict:
    """Evaluate a checkpoint, optionally with another attention method (weights unchanged).

    Defaults (factors, number of windows, batch size, corpus) come from the checkpoint's training config.
    """
    from .data import load_tokens

    factors = None if factors is None else _check_factors(factors)
    n_windows = None if n_windows is None else _check_count("n_windows", n_windows)
    batch_size = None if batch_size is None else _check_count("batch_size", batch_size)
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    tcfg = ckpt["train_config"]
    trained_method, trained_options = model.attention_method
    if method is not None or options is not None:
        model.set_attention(method or trained_method, options if options is not None else {})
    if backend is not None:
        model.cfg.backend = backend  # GPTConfig is shared by the layers
    data = data if data is not None else load_tokens(tcfg["corpus"], tcfg["tokenizer"], tcfg.get("data_path"))
    L = ckpt["model_config"]["block_size"]
    factors = tuple(factors if factors is not None else tcfg["eval_factors"])
    eval_method, eval_options = model.attention_method
    losses = evaluate_model(model, data.val, L, factors, n_windows if n_windows is not None else tcfg["eval_windows"],
                            batch_size if batch_size is not None else tcfg["eval_batch_size"], dev,
                            tcfg.get("dtype", "auto"))
    return {
        "trained": {"method": trained_method, "options": trained_options, "steps": ckpt["step"],
                    "checkpoint": str(checkpoint), "block_size": L, "params": model.num_params(),
                    "final_train_loss": _tail_mean(ckpt.get("history", []))},
        "evaluated": {"method": eval_method, "options": eval_options, "backend": model.cfg.backend},
        "data": data.summary(), "factors": list(factors), "results": losses,
        "provenance": provenance(command, dev),
    }


def _tail_mean(history) -> float | None:
    if not history:
        return None
    tail = [loss for _, loss in history[-max(1, len(history) // 10):]]
    return sum(tail) / len(tail)


def write_json(obj, path) -> None:
    """Write ``obj`` as strict JSON (non-finite numbers become null) with the package's atomic writer."""
    atomic.write_json(Path(path), obj, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def summary_table(results: dict) -> str:
    """A Markdown table of loss_window / loss_last per length for ``{variant: evaluate_checkpoint(...)}``."""
    names = list(results)
    factors = results[names[0]]["factors"]
    head = "| variant | " + " | ".join(f"{k}x window / last" for k in factors) + " |"
    rows = [head, "|---|" + "---|" * len(factors)]
    for n in names:
        r = results[n]["results"]
        rows.append(f"| {n} | " + " | ".join(f"{r[str(k)]['loss_window']:.3f} / {r[str(k)]['loss_last']:.3f}"
                                           for k in factors) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m freeatten_core evaluate",
                                 description="validation loss at k x the training length, as JSON")
    ap.add_argument("--checkpoint", required=True, help="a ckpt.pt or the run directory holding it")
    ap.add_argument("--method", default=None, help="evaluate with this attention method (default: as trained)")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="attention option")
    ap.add_argument("--factors", type=int, nargs="+", default=None, help="length multiples (default 1 2 4 8 16)")
    ap.add_argument("--windows", type=int, default=None, help="validation windows per length")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default=None, choices=["auto", "reference", "triton"])
    ap.add_argument("--out", default=None, help="write the JSON here (atomically); default: print it")
    args = ap.parse_args(argv)
    try:  # every value checked, and the output path, before any work
        if args.factors is not None:
            _check_factors(args.factors)
        for name in ("windows", "batch_size"):
            if getattr(args, name) is not None:
                _check_count("--" + name.replace("_", "-"), getattr(args, name))
        if args.out:
            atomic.check_output_file(args.out, "--out")
            atomic.remove_stale_temporaries(Path(args.out).parent, Path(args.out).name)
        options = parse_options(args.option) if args.option else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:

        res = evaluate_checkpoint(args.checkpoint, args.method, options, args.factors, args.windows,
                                  args.batch_size, args.device, args.backend,
                                  command="python -m freeatten_core evaluate " + " ".join(argv or sys.argv[1:]))
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        write_json(res, args.out)
        brief = {k: (v["loss_window"], v["loss_last"]) for k, v in res["results"].items()}
        print(atomic.dumps_json({"out": args.out, "loss_window_last": brief}, indent=None))
    else:
        print(atomic.dumps_json(res, default=_json_default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
