"""Training: AdamW, warm-up + cosine, clipping, gradient accumulation, bf16 autocast on GPU, optional
``torch.compile``, checkpoints written atomically, exact resume, DDP through ``torchrun``.

Python::

    from freeatten_core.train import TrainConfig, config_from_preset, train
    cfg = config_from_preset("ci", out_dir="runs/lssar", attention="lssar", attention_options={"p": 15})
    summary = train(cfg)

Command line::

    python -m freeatten_core train --preset ci --method lssar --option p=15 --out-dir runs/lssar
    torchrun --nproc_per_node 8 -m freeatten_core train --preset paper --method lssar --data-path DIR
    python -m freeatten_core train --preset gpu --method lssar --backend triton --throughput   # tokens/s
    python -m freeatten_core train --preset gpu --method softmax --throughput   # the yardstick (SDPA on CUDA)

Checkpoint I/O is in :mod:`freeatten_core.checkpoint`, devices and ``torchrun`` in :mod:`freeatten_core.runtime`,
the throughput measurement in :mod:`freeatten_core.bench`; this module is the training loop and its config.

Reproducibility: the batches of step ``s`` are a pure function of ``(seed, s, micro-batch index)`` (see
:func:`freeatten_core.data.get_batch`), the model is initialised from ``seed``, and a checkpoint stores the model,
the optimiser and the step. A run resumed from a checkpoint therefore continues the same loss trajectory, and a
killed run loses at most the steps since its last checkpoint. With ``W`` ranks and ``A`` accumulation steps the
global micro-batch index is ``rank·A + micro``, so ``torchrun`` over 2 ranks computes the same update as one
process with twice the accumulation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import atomic
from .checkpoint import CHECKPOINT, LOG, read_checkpoint
from .model import GPT, GPTConfig
from .presets import PRESETS, get_preset, preset_evaluation
from .runtime import autocast_for, init_distributed, parse_options


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    # data
    corpus: str = "shakespeare"
    tokenizer: str = "byte"
    data_path: str | None = None  # fineweb: the shard directory
    # model: GPTConfig fields (block_size, n_layer, ...); attention is set by the three fields below
    model: dict = field(default_factory=dict)
    attention: str = "softmax"
    attention_options: dict = field(default_factory=dict)
    backend: str = "auto"
    # optimisation
    batch_size: int = 32  # per rank and micro-step
    grad_accum: int = 1
    max_steps: int = 300
    warmup_steps: int = 30
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1337
    # system
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, float32 on cpu; or "float32" / "bfloat16"
    compile: bool = False
    ckpt_interval: int = 100  # steps between checkpoints (and one at the end)
    log_interval: int = 10
    progress: bool = True
    resume: bool = True  # continue from out_dir/ckpt.pt when it exists
    allow_config_change: bool = False  # resume although the config differs (recorded in config_changes.jsonl)
    # Evaluation settings are not training settings: they live in freeatten_core.evaluate.EvalConfig (defaults
    # per preset in freeatten_core.presets.EVALUATION), so a new evaluation never changes a training config.

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "ckpt_interval", "log_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {v!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")
        if not (self.lr > 0 and self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                      for b in betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: auto, float32, bfloat16")
        from .data import CORPORA, TOKENIZERS

        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; valid corpora: {', '.join(CORPORA)}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {self.tokenizer!r}; valid tokenizers: {', '.join(TOKENIZERS)}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"unknown device {self.device!r} (e.g. auto, cpu, cuda, cuda:1)") from e
        if not isinstance(self.out_dir, (str, os.PathLike)) or not str(self.out_dir):
            raise ValueError(f"TrainConfig.out_dir must be a non-empty path, got {self.out_dir!r}")
        self.betas = betas
        self.model_config()  # validates the model fields and the attention method/options

    def model_config(self, vocab_size: int | None = None) -> GPTConfig:
        fields = {f.name for f in dataclasses.fields(GPTConfig)}
        bad = sorted(set(self.model) - fields)
        if bad:
            raise ValueError(f"unknown model field(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
        kw = dict(self.model)
        if vocab_size is not None:
            kw["vocab_size"] = vocab_size
        return GPTConfig(**kw, attention=self.attention, attention_options=dict(self.attention_options),
                         backend=self.backend)

    @property
    def block_size(self) -> int:
        return self.model.get("block_size", GPTConfig.block_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    # Read-only aliases kept for callers written before evaluation settings left TrainConfig (notebook 04 prints
    # them): the evaluation defaults of the preset this config came from (config_from_preset records it).
    @property
    def eval_factors(self) -> tuple:
        return tuple(preset_evaluation(getattr(self, "_preset", None))["factors"])

    @property
    def eval_windows(self) -> int:
        return preset_evaluation(getattr(self, "_preset", None))["windows"]


def config_from_preset(preset: str = "ci", **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a preset; ``model=`` overrides are merged into the preset's model fields."""
    base = get_preset(preset)
    model = {**base.pop("model"), **overrides.pop("model", {})}
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown training option(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    cfg = TrainConfig(**{**base, **overrides, "model": model})
    cfg._preset = preset  # not a field: never saved, never compared on resume
    return cfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ------------------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------------------

def read_log(path) -> list[dict]:
    """The records of a ``log.jsonl``. A line that is not a JSON record with an integer ``step`` (e.g. one cut
    by a crash mid-write) is reported with its line number and skipped; the lines after it are kept."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or isinstance(rec.get("step"), bool) or not isinstance(rec.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            warnings.warn(f"{path}, line {n}: corrupt record skipped ({e}): {line[:80]!r}", stacklevel=2)
            continue
        records.append(rec)
    return records


def _log_lines(path: Path, upto_step: int) -> list[str]:
    """The JSONL lines of an earlier run up to (excluding) ``upto_step``: a resumed run rewrites the rest."""
    return [json.dumps(r) for r in read_log(path) if r["step"] < upto_step]


RESUME_FREE = ("out_dir", "progress", "resume", "allow_config_change", "device", "compile", "ckpt_interval",
               "log_interval", "data_path",
               "eval_factors", "eval_windows", "eval_batch_size")  # evaluation fields of older checkpoints
"""TrainConfig fields that may change when a run is resumed: where it runs and how often it reports, not what
it computes. Any other difference stops the resume (see :func:`config_changes`)."""

CONFIG_CHANGES = "config_changes.jsonl"


def config_changes(saved: dict, cfg: "TrainConfig") -> dict:
    """``{field: [saved value, new value]}`` for the fields outside :data:`RESUME_FREE` that differ."""
    new = cfg.to_dict()
    missing = object()
    return {k: [saved.get(k), new.get(k)] for k in sorted(set(saved) | set(new))
            if k not in RESUME_FREE and saved.get(k, missing) != new.get(k, missing)}


def _architecture(model_config: dict) -> dict:
    return {k: v for k, v in model_config.items() if k not in ("attention", "attention_options", "backend")}


def train(cfg: TrainConfig, stop_after: int | None = None, data=None) -> dict:
    """Train (or resume) and return a summary: the per-step losses, the final loss, paths and timings.

    ``stop_after``: return after this many steps of *this* call without a final checkpoint (it simulates a
    killed run; the tests use it). ``data``: a :class:`freeatten_core.data.TokenData` to use instead of loading
    ``cfg.corpus``.
    """
    from .data import get_batch, load_tokens

    dist_info, device = init_distributed(cfg.device)
    if device.type == "cuda":  # TF32 for the float32 matmuls that autocast leaves (as nanoGPT does)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = atomic.check_output_dir(cfg.out_dir, "run directory (--out-dir)")
    if dist_info.master:
        atomic.remove_stale_temporaries(out)  # partial files of a killed run
    data = data if data is not None else load_tokens(cfg.corpus, cfg.tokenizer, cfg.data_path)
    mcfg = cfg.model_config(vocab_size=data.vocab_size)
    L = mcfg.block_size

    torch.manual_seed(cfg.seed)
    model = GPT(mcfg).to(device)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, cfg.betas, device.type)
    start, history = 0, []
    ckpt_path = out / CHECKPOINT
    if cfg.resume and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path, map_location=device)
        if _architecture(ckpt["model_config"]) != _architecture(mcfg.to_dict()):
            raise ValueError(f"{ckpt_path} was trained with a different model ({ckpt['model_config']}); use another "
                             f"--out-dir or --no-resume")
        changes = config_changes(ckpt["train_config"], cfg)
        if changes:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            if not cfg.allow_config_change:
                raise ValueError(f"{ckpt_path} (step {ckpt['step']}) was trained with another config ({listed}). "
                                 f"Resume with the recorded values, use another --out-dir, start over with "
                                 f"--no-resume, or continue with the new values with --allow-config-change "
                                 f"(recorded in {out / CONFIG_CHANGES})")
            if dist_info.master:
                from .provenance import provenance

                record = {"step": int(ckpt["step"]), "changes": changes, "provenance": provenance()}
                old = (out / CONFIG_CHANGES).read_text() if (out / CONFIG_CHANGES).exists() else ""
                atomic.write_text(out / CONFIG_CHANGES, old + atomic.dumps_json(record, indent=None) + "\n")
            warnings.warn(f"resuming {ckpt_path} with a changed config ({listed}); recorded in "
                          f"{out / CONFIG_CHANGES}", stacklevel=2)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise ValueError(f"{ckpt_path}: its weights do not fit this model ({e}); use another --out-dir or "
                             f"--no-resume") from e
        optimizer.load_state_dict(ckpt["optimizer"])
        start, history = int(ckpt["step"]), list(ckpt.get("history", []))
        if "torch_rng" in ckpt:
            torch.set_rng_state(ckpt["torch_rng"].cpu())

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> None:
        if dist_info.master:
            atomic.torch_save({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "model_config": mcfg.to_dict(), "train_config": cfg.to_dict(), "history": history,
                "torch_rng": torch.get_rng_state(), "data": data.summary(), "world_size": dist_info.world,
            }, ckpt_path)
        if dist_info.world > 1:
            torch.distributed.barrier()

    log_path = out / LOG
    if dist_info.master:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(log_path, "".join(line + "\n" for line in _log_lines(log_path, start)))
        log_file = open(log_path, "a")
    tokens_per_step = cfg.batch_size * L * cfg.grad_accum * dist_info.world
    bar = None
    if dist_info.master and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc=f"train {mcfg.attention}", leave=False)

    model.train()
    t0, steps_done, step = time.perf_counter(), 0, start
    try:
        while step < cfg.max_steps:
            if stop_after is not None and steps_done >= stop_after:
                break
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = get_batch(data.train, cfg.batch_size, L, cfg.seed, step,
                                 dist_info.rank * cfg.grad_accum + micro, device)
                sync = dist_info.world == 1 or micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast_for(device, cfg.dtype):
                    _, loss = model(x, y)
                    loss = loss / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            if dist_info.world > 1:
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            grad_norm = (torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip > 0 else torch.zeros(()))
            loss_val = float(loss_sum)
            if not (math.isfinite(loss_val) and math.isfinite(float(grad_norm))):  # before the update: no NaN weights
                raise FloatingPointError(f"{'loss' if not math.isfinite(loss_val) else 'gradient norm'} became "
                                         f"{loss_val if not math.isfinite(loss_val) else float(grad_norm)} at step "
                                         f"{step} ({mcfg.attention}); the last checkpoint is intact; lower the lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append([step, loss_val])
            step += 1
            steps_done += 1
            if dist_info.master:
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    dt = time.perf_counter() - t0
                    log_file.write(json.dumps({"step": step - 1, "loss": loss_val, "lr": lr,
                                               "grad_norm": float(grad_norm), "tokens": step * tokens_per_step,
                                               "tokens_per_s": steps_done * tokens_per_step / max(dt, 1e-9)}) + "\n")
                    log_file.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_val:.3f}")
            if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
                save(step)
    finally:
        if bar is not None:
            bar.close()
        if dist_info.master:
            log_file.close()
    elapsed = time.perf_counter() - t0
    tail = [loss for _, loss in history[-max(1, len(history) // 10):]]
    return {
        "out_dir": str(out), "checkpoint": str(ckpt_path), "steps": step, "losses": [loss for _, loss in history],
        "final_loss": sum(tail) / len(tail) if tail else None, "params": raw_model.num_params(),
        "seconds": elapsed, "tokens_per_s": steps_done * tokens_per_step / max(elapsed, 1e-9),
        "attention": mcfg.attention, "attention_options": mcfg.attention_options, "world_size": dist_info.world,
    }


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m freeatten_core train",
                                 description="train a GPT with a chosen attention method")
    ap.add_argument("--preset", default="ci", help=f"one of {', '.join(PRESETS)} (default ci)")
    ap.add_argument("--method", default=None, help="attention method (freeatten_core.METHODS); default softmax")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="attention option, e.g. --option p=15 (repeatable)")
    ap.add_argument("--backend", default=None, choices=["auto", "reference", "triton"])
    ap.add_argument("--out-dir", default=None, help="run directory (checkpoint, log.jsonl)")
    ap.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                    help="model field override, e.g. --model n_layer=4 (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any other TrainConfig field, e.g. --set warmup_steps=10 (repeatable)")
    for name, typ in [("steps", int), ("batch_size", int), ("grad_accum", int), ("lr", float), ("seed", int),
                      ("device", str), ("dtype", str), ("corpus", str), ("tokenizer", str), ("data_path", str),
                      ("ckpt_interval", int), ("stop_after", int)]:
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                        help=argparse.SUPPRESS if name == "stop_after" else None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    ap.add_argument("--allow-config-change", action="store_true",
                    help="resume although the training config differs from the checkpoint's (the change is "
                         "recorded in <out-dir>/config_changes.jsonl)")
    ap.add_argument("--throughput", action="store_true", help="measure training tokens/s on random tokens only")
    return ap


# command-line flag -> the TrainConfig field it sets (the same field given by --set as well is an error)
_FLAG_FIELDS = {"method": "attention", "option": "attention_options", "backend": "backend", "model": "model",
                "steps": "max_steps", "out_dir": "out_dir", "batch_size": "batch_size", "grad_accum": "grad_accum",
                "lr": "lr", "seed": "seed", "device": "device", "dtype": "dtype", "corpus": "corpus",
                "tokenizer": "tokenizer", "data_path": "data_path", "ckpt_interval": "ckpt_interval",
                "compile": "compile", "no_progress": "progress", "no_resume": "resume",
                "allow_config_change": "allow_config_change"}


def config_from_args(args) -> TrainConfig:
    over = parse_options(args.set)
    given = {}
    for flag, fld in _FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is None or value == [] or (value is False and flag in ("no_progress", "no_resume",
                                                                           "allow_config_change")):
            continue
        if fld in over:
            raise ValueError(f"--set {fld}={json.dumps(over[fld])} and --{flag.replace('_', '-')} both set "
                             f"{fld}; give it once")
        given[fld] = value
    for fld in ("attention_options", "model"):
        if fld in given:
            given[fld] = parse_options(given[fld])
    for fld in ("progress", "resume"):
        if fld in given:
            given[fld] = False  # --no-progress, --no-resume
    over.update(given)
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    over.setdefault("out_dir", f"runs/{args.preset}_{over.get('attention', 'softmax')}")
    over.setdefault("progress", True)
    return config_from_preset(args.preset, **over)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if not args.throughput:
            atomic.check_output_dir(cfg.out_dir, "run directory (--out-dir)")
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.throughput:
        from .bench import measure_throughput

        mcfg = cfg.model_config(vocab_size=50257 if cfg.tokenizer == "gpt2" else 256)
        print(json.dumps(measure_throughput(mcfg, cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
                                            compile=cfg.compile)))
        return 0
    from .data import DataError

    try:
        summary = train(cfg, stop_after=args.stop_after)
    except (DataError, FileNotFoundError, ValueError, FloatingPointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        summary.pop("losses")
        print(atomic.dumps_json(summary, indent=None))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
