"""Named run sizes: one place that says how big a model, how long a run and how far the evaluation goes.

* ``ci``: CPU, 2 cores. Byte-level Shakespeare, L = 64, a ~0.4M-parameter model; one model trains in well under
  a minute; evaluation up to 16 x 64 = 1024 tokens. This is what the book's notebooks execute.
* ``cpu``: a laptop CPU, one core. The ``ci`` model at twice the training length (L = 128) trained on 3.3x the
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


# ------------------------------------------------------------------------------------------------------------
# Presets for the notebooks: what each chapter runs at each preset, and the one check of a `parameters` cell
# ------------------------------------------------------------------------------------------------------------

def _integer(low: int):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"parameter {name} must be an integer >= {low}, got {value!r}")
        return value
    check.__doc__ = f"an integer >= {low}"
    return check


def _number(low: float, high: float | None = None, *, open_low: bool = True):
    def check(name, value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        ok = ok and (value > low if open_low else value >= low) and (high is None or value < high)
        if not ok:
            span = f"{'>' if open_low else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
            raise ValueError(f"parameter {name} must be a number {span}, got {value!r}")
        return value
    check.__doc__ = f"a number {'>' if open_low else '>='} {low:g}" + (f", < {high:g}" if high is not None else "")
    return check


def _integer_list(low: int):
    def check(name, value):
        if not isinstance(value, (list, tuple)) or not value or any(
                isinstance(x, bool) or not isinstance(x, int) or x < low for x in value):
            raise ValueError(f"parameter {name} must be a non-empty list of integers >= {low}, got {value!r} "
                             f"(papermill: pass lists as YAML, -y \"{name}: [..]\")")
        return list(value)
    check.__doc__ = f"a non-empty list of integers >= {low}"
    return check


def _dict(name, value):
    """a dict"""
    if not isinstance(value, dict):
        raise ValueError(f"parameter {name} must be a dict, got {value!r} (papermill: pass dicts as YAML, -y)")
    return value


def _optional_path(name, value):
    """a path (string) or None"""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"parameter {name} must be a non-empty path string or None, got {value!r}")
    return value


def _choice(*options):
    def check(name, value):
        if value not in options:
            raise ValueError(f"parameter {name} must be one of {', '.join(map(repr, options))}, got {value!r}")
        return value
    check.__doc__ = "one of " + ", ".join(map(repr, options))
    return check


def _number_list(low: float):
    def check(name, value):
        if not isinstance(value, (list, tuple)) or not value or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= low for x in value):
            raise ValueError(f"parameter {name} must be a non-empty list of numbers >= {low:g}, got {value!r} "
                             f"(papermill: pass lists as YAML, -y \"{name}: [..]\")")
        return list(value)
    check.__doc__ = f"a non-empty list of numbers >= {low:g}"
    return check


def _optional_integer(low: int):
    def check(name, value):
        return None if value is None else _integer(low)(name, value)
    check.__doc__ = f"an integer >= {low}, or None"
    return check


def _tasks(name, value):
    """a non-empty list of task names (freeatten_core.tasks.TASKS)"""
    from .tasks import TASKS

    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"parameter {name} must be a non-empty list of task names, got {value!r}")
    bad = [t for t in value if t not in TASKS]
    if bad:
        raise ValueError(f"parameter {name}: unknown task(s) {', '.join(map(repr, bad))}; valid tasks: "
                         f"{', '.join(TASKS)}")
    return list(value)


def _variants(name, value):
    """a non-empty list of variant names (freeatten_core.experiments.VARIANTS)"""
    from .experiments import get_variants

    if isinstance(value, tuple):
        value = list(value)
    get_variants(value)  # raises naming the unknown ones and the valid names
    return value


NOTEBOOK_PARAMETERS: dict[str, dict] = {
    "01_softmax_decomposition": dict(
        checks=dict(seed=_integer(0), row_length=_integer(2), score_scale=_number(0.0),
                    ablation_steps=_integer(1), ablation_batch=_integer(1)),
        presets={"ci": dict(ablation_steps=100, ablation_batch=16),
                 "cpu": dict(ablation_steps=400, ablation_batch=16),
                 "gpu": dict(ablation_steps=1000, ablation_batch=64),
                 "paper": dict(ablation_steps=2000, ablation_batch=64)},
    ),
    "02_entropy_scaling": dict(
        checks=dict(d=_integer(2), lengths=_integer_list(2), n_queries=_integer(1),
                    needle_cos=_number(-1.0, 1.0), away=_number(0.0, open_low=False), trials=_integer(1),
                    seed=_integer(0)),
        presets={"ci": dict(lengths=[16, 64, 256, 1024, 4096, 16384], trials=4),
                 "cpu": dict(lengths=[16, 64, 256, 1024, 4096, 16384, 65536], trials=8),
                 "gpu": dict(lengths=[16, 256, 4096, 65536], trials=16),
                 "paper": dict(lengths=[16, 256, 4096, 65536], trials=16)},
    ),
    "04_training_extrapolation": dict(
        checks=dict(variants=_variants, overrides=_dict, run_dir=_optional_path, results_dir=_optional_path,
                    threads=_integer(0)),
        presets={"ci": {}, "cpu": {}, "gpu": {}, "paper": {}},  # the training preset is `preset` itself
    ),
    "03_gpu_kernel": dict(
        checks=dict(seed=_integer(0), batch=_integer(1), heads=_integer(1), check_length=_integer(1),
                    head_dim=_choice(16, 32, 64, 128), dtype=_choice("float32", "float16", "bfloat16"),
                    timing_lengths=_integer_list(1)),
        presets={"ci": dict(batch=2, heads=2, check_length=100, head_dim=64, dtype="float32",
                            timing_lengths=[64, 128, 256]),
                 "cpu": dict(batch=2, heads=2, check_length=257, head_dim=64, dtype="float32",
                             timing_lengths=[64, 128, 256]),
                 "gpu": dict(batch=4, heads=16, check_length=2048, head_dim=128, dtype="bfloat16",
                             timing_lengths=[1024, 2048, 4096, 8192]),
                 "paper": dict(batch=4, heads=16, check_length=4096, head_dim=128, dtype="bfloat16",
                               timing_lengths=[1024, 2048, 4096, 8192, 16384])},
    ),
    "05_beyond_the_loss_curve": dict(
        checks=dict(variants=_variants, seeds=_integer_list(0), tasks=_tasks, factors=_integer_list(1),
                    loss_factors=_integer_list(1), ps=_number_list(1.0), window=_optional_integer(1),
                    stream_variants=_variants, examples=_integer(1), overrides=_dict, run_dir=_optional_path,
                    results_path=_optional_path, threads=_integer(0)),
        # the training preset is `preset` itself; at ci the chapter trains tiny models (a demonstration of the
        # machinery in a few minutes), at the other presets the preset's own model
        presets={"ci": dict(overrides=dict(model=dict(block_size=32, n_layer=2, n_head=2, n_embd=64), max_steps=100,
                                           warmup_steps=10, batch_size=16, ckpt_interval=100)),
                 "cpu": dict(overrides={}), "gpu": dict(overrides={}), "paper": dict(overrides={})},
    ),
    "06_use_in_your_model": dict(
        checks=dict(seed=_integer(0), p=_number(1.0, 1000.0, open_low=False), length=_integer(6)),
        presets={"ci": dict(length=12), "cpu": dict(length=12), "gpu": dict(length=12), "paper": dict(length=12)},
    ),
}
"""What each chapter runs at each preset. Every chapter registered here takes a ``preset`` parameter (one of
:data:`PRESETS`) beside its own (``checks``: name -> check); a parameter its ``parameters`` cell leaves at
``None`` takes the value of ``presets[preset]``, and a value given explicitly (papermill ``-p``/``-y``) wins.
The ``ci`` values are what the book executes."""

SEED_RUNS: dict[str, dict] = {
    "cpu": dict(seeds=(0, 1, 2), variants=("softmax", "lssa", "lssar", "lssa+reweight@eval")),
}
"""Presets whose extrapolation experiment ``python -m freeatten_core reproduce`` also runs once per training
seed (``results/<preset>/seeds/seed<N>/``), for the spread over seeds the book shows beside single runs."""

PAPERMILL_HEADER = "# Parameters\n"
"""The first line of the cell papermill injects after a notebook's ``parameters`` cell."""

_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def notebook_preset(notebook: str, preset: str) -> dict:
    """The values chapter ``notebook`` takes at ``preset`` for the parameters it leaves at ``None``."""
    spec = _notebook_spec(notebook)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return copy.deepcopy(spec["presets"].get(preset, {}))


def _notebook_spec(notebook: str) -> dict:
    if notebook not in NOTEBOOK_PARAMETERS:
        raise ValueError(f"notebook {notebook!r} has no parameters registered in freeatten_core/presets.py "
                         f"(NOTEBOOK_PARAMETERS); registered: {', '.join(NOTEBOOK_PARAMETERS)}")
    return NOTEBOOK_PARAMETERS[notebook]


def _assigned_names(source: str) -> list[str]:
    """Names assigned at the top level of a cell's source (what papermill injects is ``name = value`` lines)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return names


def check_parameters(notebook: str, namespace: dict) -> dict:
    """Check the parameters of chapter ``notebook`` and fill in its preset's values; returns them as a dict.

    Call it in the first cell after the ``parameters`` cell, with ``globals()``: it runs after the cell papermill
    injects, so it sees the injected values. It raises ``ValueError`` naming

    * an unknown preset (and the valid ones),
    * an injected parameter the chapter does not have (papermill only warns about those), with the valid names,
    * a parameter with a bad value (and what it must be), or one the ``parameters`` cell does not define.

    Parameters left at ``None`` take the preset's value (:data:`NOTEBOOK_PARAMETERS`), written back into
    ``namespace`` so the chapter's code uses them by name.
    """
    spec = _notebook_spec(notebook)
    valid = ["preset", *spec["checks"]]
    history = namespace.get("In")
    if isinstance(history, list) and len(history) >= 2 and str(history[-2]).startswith(PAPERMILL_HEADER):
        unknown = [n for n in _assigned_names(history[-2]) if n not in valid]
        if unknown:
            raise ValueError(f"unknown parameter{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))} for {notebook}; valid parameters: {', '.join(valid)}")
    missing = [n for n in valid if n not in namespace]
    if missing:
        raise ValueError(f"{notebook}: the parameters cell does not define {', '.join(missing)}")
    preset = namespace["preset"]
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)} (presets/<name>.yaml)")
    values = {"preset": preset}
    defaults = notebook_preset(notebook, preset)
    for name, check in spec["checks"].items():
        value = namespace[name]
        if value is None and name in defaults:
            value = copy.deepcopy(defaults[name])
        values[name] = value if value is None and check is _optional_path else check(name, value)
    namespace.update(values)
    return values


def preset_file_text(name: str) -> str:
    """The YAML file papermill takes for preset ``name`` (``presets/<name>.yaml``): the preset's name, with
    comments saying what it means for each chapter. Generated from this module; never edited by hand."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    m = p["model"]
    lines = [f"# The `{name}` preset, for papermill:  papermill notebooks/NAME.ipynb OUT.ipynb -f presets/{name}.yaml",
             "# or for every chapter at once:       python -m freeatten_core reproduce --preset " + name,
             "# Generated from freeatten_core/presets.py by `python -m freeatten_core presets --write`; edit that",
             "# file, not this one. Each chapter resolves the preset itself (freeatten_core.presets.check_parameters):",
             f"#   training: {p['corpus']} ({p['tokenizer']} tokens), L = {m['block_size']}, {m['n_layer']} layers x "
             f"{m['n_embd']} wide, {p['max_steps']} steps of {p['batch_size'] * p['grad_accum']} sequences "
             f"on {p['device']}",
             f"#   evaluation: k = {', '.join(map(str, EVALUATION[name]['factors']))} x L, "
             f"{EVALUATION[name]['windows']} windows"]
    for nb, spec in NOTEBOOK_PARAMETERS.items():
        vals = spec["presets"].get(name, {})
        text = ", ".join(f"{k} = {v}" for k, v in vals.items()) or "the training and evaluation sizes above"
        lines.append(f"#   {nb}: {text}")
    lines.append(f"preset: {name}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """``python -m freeatten_core presets [--write | --check]``: list the presets, or write/check presets/*.yaml."""
    import argparse
    import sys
    from pathlib import Path

    from . import atomic

    ap = argparse.ArgumentParser(prog="python -m freeatten_core presets",
                                 description="the run sizes, and the presets/<name>.yaml files papermill takes")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write presets/<name>.yaml for every preset")
    group.add_argument("--check", action="store_true", help="exit 1 if a presets/<name>.yaml file is out of date")
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / "presets"),
                    help="where the files are (default: presets/ at the repository root)")
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    if args.write:
        try:
            atomic.check_output_dir(folder, "--dir")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for name in PRESETS:
            atomic.write_text(folder / f"{name}.yaml", preset_file_text(name))
        print(f"wrote {', '.join(f'{n}.yaml' for n in PRESETS)} to {folder}")
        return 0
    if args.check:
        stale = [n for n in PRESETS if not (folder / f"{n}.yaml").exists()
                 or (folder / f"{n}.yaml").read_text() != preset_file_text(n)]
        if stale:
            print(f"out of date: {', '.join(f'{n}.yaml' for n in stale)} in {folder}; run "
                  f"python -m freeatten_core presets --write", file=sys.stderr)
            return 1
        print(f"presets/*.yaml up to date ({', '.join(PRESETS)})")
        return 0
    for name in PRESETS:
        print(preset_file_text(name))
    return 0
