"""Checkpoints: the file names of a run directory, reading a checkpoint with clear errors, and the trained model.

A checkpoint (``<run>/ckpt.pt``, written atomically by :func:`freeatten_core.train.train`) is a dict with the
model weights, ``model_config`` (the :class:`~freeatten_core.model.GPTConfig` fields), ``train_config``, ``step``,
the optimiser state, the loss history and a summary of the data it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import GPT, GPTConfig

CHECKPOINT = "ckpt.pt"
LOG = "log.jsonl"
CKPT_KEYS = ("model", "model_config", "train_config", "step")


def checkpoint_path(path) -> Path:
    """``path`` itself, or ``path/ckpt.pt`` when ``path`` is a run directory."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict, with a clear error for a missing, unreadable or foreign file."""
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CKPT_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a freeatten_core checkpoint (needs keys {', '.join(CKPT_KEYS)}; has {have})")
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
