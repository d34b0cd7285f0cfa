"""The evaluation runner: load a checkpoint, choose the attention method and backend, run tasks over lengths
k·L (L = the training length), and write the results with their provenance.

The tasks themselves (what is measured and how it is scored) are in :mod:`freeatten_core.tasks`; the first is
``loss``, the validation loss at k·L, with two numbers per length because they answer different questions:

* ``loss_window``: the mean loss over the whole window of k·L tokens, what most papers report. It flatters
  long windows: the first L positions of every window are in-distribution, and a model that fails beyond L is
  still averaged with them.
* ``loss_last``: the mean loss over the last L tokens of the window, i.e. only positions (k-1)·L … k·L - 1,
  the ones that need extrapolation. At k = 1 both numbers are the same.

plus ``loss_by_position`` (the mean over windows at every position), for the plots. The loss results stay under
``"results"`` (as before the task structure); every other task's results are under ``"tasks"``.

Python::

    from freeatten_core.evaluate import evaluate_checkpoint
    res = evaluate_checkpoint("runs/lssa", method="lssar", options={"p": 15})   # LSSA, re-weighted at inference
    res = evaluate_checkpoint("runs/lssar", tasks=("passkey", "recall", "induction"), factors=(1, 4, 16))

Command line::

    python -m freeatten_core evaluate --checkpoint runs/lssa --method lssar --option p=15 --out res.json
    python -m freeatten_core evaluate --checkpoint runs/lssar --task passkey --task induction --factors 1 4 16
    python -m freeatten_core evaluate --checkpoint runs/softmax --rope-scaling yarn --rope-factor length

RoPE scaling at inference (``rope_scaling=(kind, factor)``, :meth:`freeatten_core.model.GPT.set_rope_scaling`):
``kind`` is ``ntk`` or ``yarn``; ``factor`` a number >= 1, or ``"length"``: at each length k·L the factor k (the
scaling set for the length evaluated, which is how NTK and YaRN are used).
"""

from __future__ import annotations

import argparse
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .checkpoint import load_model
from .presets import preset_evaluation
from .provenance import provenance
from .runtime import parse_options, resolve_device
from .tasks import TASKS, check_tasks, get_task


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


def check_rope_scaling(rope_scaling) -> tuple | None:
    """None, or ``(kind, factor)`` with factor a number >= 1 or ``"length"`` (k at each length k·L)."""
    from .model import check_rope_scaling as check

    if rope_scaling is None:
        return None
    if isinstance(rope_scaling, (str, bytes)) or not isinstance(rope_scaling, (list, tuple)) or len(rope_scaling) != 2:
        raise ValueError(f"rope_scaling must be (kind, factor), e.g. ('yarn', 'length') or ('ntk', 4), got "
                         f"{rope_scaling!r}")
    kind, factor = rope_scaling
    if factor == "length":
        check(kind, 1.0)
        return kind, factor
    return check(kind, factor)


@dataclass
class EvalConfig:
    """What an evaluation runs: ``tasks`` at lengths ``factors`` × L, ``windows`` examples per task and length,
    in batches of ``batch_size``; ``seed`` draws the synthetic tasks' examples. Defaults per preset:
    :data:`freeatten_core.presets.EVALUATION` (:meth:`from_preset`)."""
    tasks: tuple = ("loss",)
    factors: tuple = (1, 2, 4, 8, 16)
    windows: int = 16
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        self.tasks = check_tasks(self.tasks)
        self.factors = _check_factors(self.factors)
        self.windows = _check_count("windows", self.windows)
        self.batch_size = _check_count("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @classmethod
    def from_preset(cls, preset: str | None, **overrides) -> "EvalConfig":
        return cls(**{**preset_evaluation(preset), **{k: v for k, v in overrides.items() if v is not None}})


def run_task(model, task, block_size: int, factors, n: int, batch_size: int = 16, tokenizer=None, data=None,
             seed: int = 0, device=None, dtype: str = "auto", rope_scaling=None) -> dict:
    """``{str(k): task result at k·block_size}`` for one task (name or :class:`~freeatten_core.tasks.Task`).

    ``rope_scaling``: ``(kind, factor)`` set on the model for the run (see :func:`check_rope_scaling`); the
    model's own scaling is restored afterwards."""
    task = get_task(task) if isinstance(task, str) else task
    factors = _check_factors(factors)
    rope_scaling = check_rope_scaling(rope_scaling)
    before = model.rope_scaling if rope_scaling is not None else None
    out = {}
    try:
        for k in factors:
            if rope_scaling is not None:
                kind, factor = rope_scaling
                model.set_rope_scaling(kind, float(k) if factor == "length" else factor)
            ex = task.make_examples(tokenizer, int(k) * block_size, n, seed, data=data, block_size=block_size)
            res = task.score(model, ex, batch_size=batch_size, device=device, dtype=dtype)
            out[str(k)] = {"factor": int(k), **res}
            if rope_scaling is not None:
                out[str(k)]["rope_scaling"] = list(model.rope_scaling)
    finally:
        if before is not None:
            model.set_rope_scaling(*before)
    return out


@torch.no_grad()
def evaluate_model(model, val_docs, block_size: int, factors=(1, 2, 4, 8, 16), n_windows: int = 16,
                   batch_size: int = 16, device=None, dtype: str = "auto") -> dict:
    """The ``loss`` task at each length k·``block_size``; ``val_docs`` is a list of token arrays (documents)."""
    from .data import TokenData

    factors = _check_factors(factors)
    n_windows, batch_size = _check_count("n_windows", n_windows), _check_count("batch_size", batch_size)
    data = TokenData(train=np.zeros(0, np.int64), val=list(val_docs), vocab_size=model.lm_head.out_features,
                     tokenizer="?", corpus="?")
    return run_task(model, "loss", block_size, factors, n_windows, batch_size, data=data, device=device,
                    dtype=dtype)


def check_vocabulary(model_vocab: int, tokenizer, what: str) -> None:
    if tokenizer.vocab_size != model_vocab:
        raise ValueError(f"{what}: the checkpoint's model has a vocabulary of {model_vocab} tokens but its "
                         f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} has {tokenizer.vocab_size}: a "
                         f"checkpoint of another vocabulary cannot be evaluated with this tokenizer or corpus")


def evaluate_checkpoint(checkpoint, method: str | None = None, options: dict | None = None, factors=None,
                        n_windows: int | None = None, batch_size: int | None = None, device="auto",
                        backend: str | None = None, data=None, command: str | None = None, tasks=("loss",),
                        seed: int = 0, preset: str | None = None, rope_scaling=None) -> dict:
    """Evaluate a checkpoint on ``tasks``, optionally with another attention method or backend and RoPE scaling
    (``(kind, factor)``, see :func:`check_rope_scaling`; weights unchanged). Unset values come from
    :class:`EvalConfig` for ``preset`` (default: the package defaults)."""
    from .data import get_tokenizer, load_tokens

    rope_scaling = check_rope_scaling(rope_scaling)

    ecfg = EvalConfig.from_preset(preset, tasks=tasks, factors=factors, windows=n_windows, batch_size=batch_size,
                                  seed=seed)
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    tcfg = ckpt["train_config"]
    legacy = {k: tcfg[f"eval_{k}"] for k in ("factors", "windows", "batch_size") if f"eval_{k}" in tcfg}
    if preset is None and legacy:  # a checkpoint written while TrainConfig held the evaluation settings
        ecfg = EvalConfig(**{**legacy, "tasks": ecfg.tasks, "seed": ecfg.seed,
                             **{k: v for k, v in (("factors", factors), ("windows", n_windows),
                                                  ("batch_size", batch_size)) if v is not None}})
    trained_method, trained_options = model.attention_method
    model.set_attention(method, options, backend)  # one call; None keeps what the model was trained with
    vocab = ckpt["model_config"]["vocab_size"]
    if data is not None:
        if data.vocab_size != vocab:
            raise ValueError(f"{checkpoint}: the checkpoint's model has a vocabulary of {vocab} tokens, the data "
                             f"{data.vocab_size} ({data.tokenizer}): a checkpoint of another vocabulary")
    elif any(get_task(t).needs_data for t in ecfg.tasks):
        data = load_tokens(tcfg["corpus"], tcfg["tokenizer"], tcfg.get("data_path"))
    tokenizer = get_tokenizer(tcfg["tokenizer"])
    check_vocabulary(vocab, tokenizer, str(checkpoint))
    L = ckpt["model_config"]["block_size"]
    eval_method, eval_options = model.attention_method
    results = {t: run_task(model, t, L, ecfg.factors, ecfg.windows, ecfg.batch_size, tokenizer, data, ecfg.seed,
                           dev, tcfg.get("dtype", "auto"), rope_scaling) for t in ecfg.tasks}
    out = {
        "trained": {"method": trained_method, "options": trained_options, "steps": ckpt["step"],
                    "checkpoint": str(checkpoint), "block_size": L, "params": model.num_params(),
                    "final_train_loss": _tail_mean(ckpt.get("history", [])), "seed": tcfg.get("seed")},
        "evaluated": {"method": eval_method, "options": eval_options, "backend": model.attention_backend,
                      "rope_scaling": None if rope_scaling is None else list(rope_scaling)},
        "data": data.summary() if data is not None else None, "factors": list(ecfg.factors),
        "evaluation": {"tasks": list(ecfg.tasks), "windows": ecfg.windows, "batch_size": ecfg.batch_size,
                       "seed": ecfg.seed},
    }
    if "loss" in results:
        out["results"] = results.pop("loss")
    out["tasks"] = results
    out["provenance"] = provenance(command, dev)
    return out


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
    ap.add_argument("--task", action="append", default=None, metavar="TASK",
                    help=f"task to run (repeatable; default loss): {', '.join(TASKS)}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic tasks' examples")
    ap.add_argument("--rope-scaling", default=None, metavar="KIND", help="RoPE scaling at inference: ntk or yarn")
    ap.add_argument("--rope-factor", default="length", metavar="F",
                    help="its factor: a number >= 1, or 'length' (k at each length k·L; the default)")
    ap.add_argument("--out", default=None, help="write the JSON here (atomically); default: print it")
    args = ap.parse_args(argv)
    try:  # every value checked, and the output path, before any work
        if args.factors is not None:
            _check_factors(args.factors)
        for name in ("windows", "batch_size"):
            if getattr(args, name) is not None:
                _check_count("--" + name.replace("_", "-"), getattr(args, name))
        tasks = check_tasks(args.task) if args.task else ("loss",)
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        if args.out:
            atomic.check_output_file(args.out, "--out")
            atomic.remove_stale_temporaries(Path(args.out).parent, Path(args.out).name)
        options = parse_options(args.option) if args.option else None
        rope = None
        if args.rope_scaling is not None:
            try:
                factor = args.rope_factor if args.rope_factor == "length" else float(args.rope_factor)
            except ValueError:
                raise ValueError(f"--rope-factor must be a number >= 1 or 'length', got {args.rope_factor!r}") from None
            rope = check_rope_scaling((args.rope_scaling, factor))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        res = evaluate_checkpoint(args.checkpoint, args.method, options, args.factors, args.windows,
                                  args.batch_size, args.device, args.backend, tasks=tasks, seed=args.seed,
                                  rope_scaling=rope,
                                  command="python -m freeatten_core evaluate " + " ".join(argv or sys.argv[1:]))
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        write_json(res, args.out)
        brief = {"out": args.out}
        if "results" in res:
            brief["loss_window_last"] = {k: (v["loss_window"], v["loss_last"]) for k, v in res["results"].items()}
        for t, r in res["tasks"].items():
            brief[f"{t}_accuracy"] = {k: v["accuracy"] for k, v in r.items()}
        print(atomic.dumps_json(brief, indent=None))
    else:
        print(atomic.dumps_json(res, default=_json_default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
