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
import numbers
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import atomic
from .model import GPT, GPTConfig
from .presets import PRESETS, get_preset

CHECKPOINT = "ckpt.pt"
LOG = "log.jsonl"


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
    # evaluation (used by freeatten_core.evaluate)
    eval_factors: tuple = (1, 2, 4, 8, 16)
    eval_windows: int = 16
    eval_batch_size: int = 16

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "ckpt_interval", "log_interval", "eval_windows",
                     "eval_batch_size"):
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
        factors = tuple(self.eval_factors) if isinstance(self.eval_factors, (list, tuple)) else ()
        if not factors or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1
                                       for k in factors):
            raise ValueError(f"TrainConfig.eval_factors must be a non-empty list of integers >= 1, "
                             f"got {self.eval_factors!r}")
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
        self.betas, self.eval_factors = betas, tuple(int(k) for k in factors)
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
        d["betas"], d["eval_factors"] = list(self.betas), list(self.eval_factors)
        return d


def config_from_preset(preset: str = "ci", **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a preset; ``model=`` overrides are merged into the preset's model fields."""
    base = get_preset(preset)
    model = {**base.pop("model"), **overrides.pop("model", {})}
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown training option(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}")
    return TrainConfig(**{**base, **overrides, "model": model})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ------------------------------------------------------------------------------------------------------------
# Devices, distribution, precision
# ------------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; pass --device cpu")
    return dev


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on GPU (``dtype`` auto or bfloat16); nothing on CPU unless bfloat16 is asked for."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local, world), device


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------

# The package's one atomic writer (freeatten_core.atomic); these names are kept for callers of train.py.
atomic_torch_save = atomic.torch_save
atomic_write_text = atomic.write_text


_CKPT_KEYS = ("model", "model_config", "train_config", "step")


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict, with a clear error for a missing, unreadable or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CKPT_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a freeatten_core checkpoint (needs keys {', '.join(_CKPT_KEYS)}; has {have})")
    return ckpt


def load_model(path, device="cpu") -> tuple[GPT, dict]:
    """The trained model (eval mode) and its checkpoint dict."""
    ckpt = read_checkpoint(path)
    bad = [k for k, t in ckpt["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"checkpoint {path} holds non-finite (NaN/Inf) weights in {', '.join(bad[:5])}"
                         f"{' and more' if len(bad) > 5 else ''}: it cannot be evaluated; resume from an earlier "
                         f"checkpoint or retrain")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: the weights do not fit its model config ({e})") from e
    return model.to(device).eval(), ckpt


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
               "log_interval", "data_path")
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
            atomic_torch_save({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "model_config": mcfg.to_dict(), "train_config": cfg.to_dict(), "history": history,
                "torch_rng": torch.get_rng_state(), "data": data.summary(), "world_size": dist_info.world,
            }, ckpt_path)
        if dist_info.world > 1:
            torch.distributed.barrier()

    log_path = out / LOG
    if dist_info.master:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(log_path, "".join(line + "\n" for line in _log_lines(log_path, start)))
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
# Throughput (tokens/s) of one training step, e.g. fused LSSAR against SDPA softmax on a GPU
# ------------------------------------------------------------------------------------------------------------

def measure_throughput(model_cfg: GPTConfig, batch_size: int, steps: int = 20, warmup: int = 5, device="auto",
                       dtype: str = "auto", compile: bool = False, seed: int = 0) -> dict:
    """Training tokens per second (forward + backward + AdamW) on random tokens of length ``block_size``.

    The GPU comparison is ``lssar`` with ``backend="triton"`` against ``softmax`` with ``backend="auto"``, which
    on CUDA runs PyTorch SDPA (flash) through :func:`freeatten_core.attention`; same model otherwise.
    """
    device = resolve_device(device) if isinstance(device, str) else device
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
    return {"attention": model_cfg.attention, "backend": "sdpa" if sdpa else model_cfg.backend, "batch_size": batch_size, "block_size": L, "params": model.num_params(),
            "ms_per_step": 1000 * dt, "tokens_per_s": batch_size * L / dt, "device": str(device), "dtype": dtype,
            "compile": compile}


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------

def parse_options(items) -> dict:
    """``["p=15", "offset_rows=3"]`` -> ``{"p": 15, "offset_rows": 3}`` (values parsed as JSON when they can be)."""
    out = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if k in out:
            raise ValueError(f"{k} is given twice ({k}={json.dumps(out[k])} and {item}); give it once")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


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
