"""Named run sizes: one place that says how big a model, how long a run and how far the evaluation goes.

* ``ci``: CPU, 2 cores. Byte-level Shakespeare, L = 64, a ~0.4M-parameter model; one model trains in well under
  a minute; evaluation up to 16 x 64 = 1024 tokens. This is what the book's notebooks execute.
* ``cpu``: a laptop CPU, one core. The ``ci`` model at twice the training length (L = 128) trained on 2.7x the
  tokens (1000 steps of 16 x 128): a few minutes per model, long enough for the curves beyond L to separate;
  evaluation up to 16 x 128 = 2048 tokens over 32 windows. The book's committed multi-seed run
  (``results/cpu/``) is this preset.
* ``gpu``: one H100. GPT-2 BPE Shakespeare, L = 256, 6 layers x 384 wide (~30M parameters with the tied
  50257-token embedding, ~11M without), ~10 minutes per model at bf16; evaluation up to 16 x 256 = 4096 tokens.
  Shakespeare is small (1.4M BPE training tokens): 1500 steps of 64 x 256 tokens see it about 17 times, so
  dropout is 0.2 and the notebook prints the final training loss beside the validation loss at 1x (a large
  gap means over-fitting). The validation loss at 1x is not a language-modelling benchmark, only the
  reference for the longer lengths.
* ``paper``: GPT-2 small (124M), L = 1024, FineWeb-Edu shards, the GPT-2/FineWeb recipe (AdamW
  beta = (0.9, 0.95), lr 6e-4 cosine to 6e-5, 715 warm-up steps, weight decay 0.1, 524,288 tokens per step
  = 8 GPUs x 64 x 1024, 18,865 steps). For ``torchrun --nproc_per_node 8``. Methods without a fused kernel
  run on the reference path, which materialises the [L, L] weights: for those, trade batch for accumulation
  (``--batch-size 16 --grad-accum 4`` keeps the 524,288 tokens per step).

A preset is a plain dict of :class:`~freeatten_core.train.TrainConfig` fields (plus the model fields under
``"model"``); every field can be overridden from the command line or from Python. Its evaluation defaults
(lengths, windows, batch) are in :data:`EVALUATION`, apart from training.
"""

from __future__ import annotations

import copy

PRESETS: dict[str, dict] = {
    "ci": dict(
        corpus="shakespeare", tokenizer="byte", device="cpu",
        model=dict(block_size=64, n_layer=2, n_head=4, n_embd=128, dropout=0.0),
        batch_size=32, grad_accum=1, max_steps=300, warmup_steps=30,
        lr=3e-3, min_lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
        ckpt_interval=100, log_interval=10, compile=False,
    ),
    "cpu": dict(
        corpus="shakespeare", tokenizer="byte", device="cpu",
        model=dict(block_size=128, n_layer=2, n_head=4, n_embd=128, dropout=0.0),
        batch_size=16, grad_accum=1, max_steps=1000, warmup_steps=100,
        lr=3e-3, min_lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
        ckpt_interval=250, log_interval=25, compile=False,
    ),
    "gpu": dict(
        corpus="shakespeare", tokenizer="gpt2", device="cuda",
        model=dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
        batch_size=64, grad_accum=1, max_steps=1500, warmup_steps=100,
        lr=1e-3, min_lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
        ckpt_interval=500, log_interval=50, compile=False,
    ),
    "paper": dict(
        corpus="fineweb", tokenizer="gpt2", device="cuda",
        model=dict(block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0),
        batch_size=64, grad_accum=1,  # x 8 GPUs x 1024 tokens = 524,288 tokens per step
        max_steps=18865, warmup_steps=715,
        lr=6e-4, min_lr=6e-5, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
        ckpt_interval=1000, log_interval=10, compile=True,
    ),
}


EVALUATION: dict[str, dict] = {
    "ci": dict(factors=(1, 2, 4, 8, 16), windows=16, batch_size=4),
    "cpu": dict(factors=(1, 2, 4, 8, 16), windows=32, batch_size=4),
    "gpu": dict(factors=(1, 2, 4, 8, 16), windows=64, batch_size=8),
    "paper": dict(factors=(1, 2, 4, 8, 16), windows=64, batch_size=1),
}
"""Evaluation defaults per preset (:class:`freeatten_core.evaluate.EvalConfig` fields): the length multiples
k of the training length L, how many windows or examples per length, and the evaluation batch size. They are
not training settings, so changing them never touches a checkpoint's training config."""

DEFAULT_EVALUATION = dict(factors=(1, 2, 4, 8, 16), windows=16, batch_size=16)
"""For checkpoints whose preset is unknown."""


def preset_evaluation(name: str | None) -> dict:
    """A copy of the evaluation defaults of preset ``name`` (``None``: :data:`DEFAULT_EVALUATION`)."""
    if name is None:
        return dict(DEFAULT_EVALUATION)
    if name not in EVALUATION:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(EVALUATION)}")
    return dict(EVALUATION[name])


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (raises with the valid names)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
