"""The experiments the book runs, as functions: the 1x-16x length-extrapolation comparison and the softmax
decomposition ablation. Notebooks and ``scripts/`` call these; nothing here is notebook-specific.

    from freeatten_core.experiments import run_extrapolation, decomposition_ablation
    results = run_extrapolation("ci", out_dir="runs/extrapolation_ci")     # {variant: evaluation dict}
    rows = decomposition_ablation("ci", steps=60)                             # [{method, phi, l1, ...}]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .evaluate import evaluate_checkpoint, write_json
from .train import config_from_preset, train


@dataclass(frozen=True)
class Variant:
    """A trained model (``method`` + ``options``) evaluated with ``eval_method`` + ``eval_options``.

    Variants that share ``method`` and ``options`` share one training run.
    """
    name: str
    method: str
    options: dict = field(default_factory=dict)
    eval_method: str | None = None  # None: as trained
    eval_options: dict | None = None

    @property
    def run_name(self) -> str:
        opts = "_".join(f"{k}{v}" for k, v in sorted(self.options.items()))
        return self.method + (f"_{opts}" if opts else "")


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("softmax", "softmax"),
    Variant("lssa", "lssa"),
    Variant("lssar", "lssar", {"p": 15.0}),
    # the early "fine-tuning-free" claim: train LSSA, switch the re-weighting on only at inference
    Variant("lssa+reweight@eval", "lssa", {}, "lssar", {"p": 15.0}),
    Variant("ssmax", "ssmax"),  # Scalable-Softmax with a learned s per head
    Variant("sigmoid", "sigmoid"),
]}
DEFAULT_VARIANTS = ("softmax", "lssa", "lssar", "lssa+reweight@eval", "ssmax")


def get_variants(names) -> list[Variant]:
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, bad))}; valid variants: {', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in names]


def run_extrapolation(preset: str = "ci", variants=DEFAULT_VARIANTS, out_dir="runs/extrapolation", results_dir=None,
                      overrides: dict | None = None, progress: bool = False, command: str | None = None) -> dict:
    """Train each distinct model of ``variants`` at ``preset`` (resuming finished runs), evaluate every variant
    at 1x..16x, and return ``{variant: evaluation}`` (each with its training summary under ``"training"``).

    ``results_dir``: also write ``<results_dir>/<variant>.json`` (atomically).
    """
    vs = get_variants(list(variants))
    out_dir = Path(out_dir)
    trained = {}
    for v in vs:
        if v.run_name in trained:
            continue
        cfg = config_from_preset(preset, **{**(overrides or {}), "out_dir": str(out_dir / v.run_name),
                                            "attention": v.method, "attention_options": dict(v.options),
                                            "progress": progress})
        summary = train(cfg)
        summary.pop("losses")
        trained[v.run_name] = (cfg, summary)
    results = {}
    for v in vs:
        cfg, summary = trained[v.run_name]
        res = evaluate_checkpoint(summary["checkpoint"], v.eval_method, v.eval_options, device=cfg.device,
                                  command=command or f"freeatten_core.experiments.run_extrapolation({preset!r})")
        res["variant"], res["preset"], res["training"] = v.name, preset, summary
        results[v.name] = res
        if results_dir is not None:
            write_json(res, Path(results_dir) / f"{v.name.replace('@', '_at_').replace('+', '_')}.json")
    return results


# ------------------------------------------------------------------------------------------------------------
# The decomposition ablation: which part of softmax matters, the exponential or the l1 normalisation?
# ------------------------------------------------------------------------------------------------------------

POSITIVITY_MAPS = ("exp", "softplus", "relu", "sigmoid")


def decomposition_ablation(preset: str = "ci", steps: int = 120, maps=POSITIVITY_MAPS, out_dir="runs/ablation",
                           overrides: dict | None = None, eval_windows: int = 16) -> list[dict]:
    """Train φ ∈ ``maps`` × {with ℓ1, without ℓ1} (methods ``exp_l1``, ``exp_nol1``, …) for ``steps`` steps at
    ``preset`` size; return one row per method with the final training loss (mean of the last 10% of steps)
    and the validation loss at the training length."""
    bad = [m for m in maps if m not in POSITIVITY_MAPS]
    if bad:
        raise ValueError(f"unknown positivity map(s) {bad}; valid: {', '.join(POSITIVITY_MAPS)}")
    rows = []
    for phi in maps:
        for l1 in (True, False):
            method = f"{phi}_{'l1' if l1 else 'nol1'}"
            over = {"max_steps": steps, "warmup_steps": max(1, steps // 10), "ckpt_interval": steps,
                    **(overrides or {}), "out_dir": str(Path(out_dir) / method), "attention": method,
                    "progress": False, "eval_windows": eval_windows}
            cfg = config_from_preset(preset, **over)
            try:
                summary = train(cfg)
                ev = evaluate_checkpoint(summary["checkpoint"], factors=(1,), device=cfg.device)
                final, val = summary["final_loss"], ev["results"]["1"]["loss_window"]
                status = "ok"
            except FloatingPointError as e:  # a diverged run is a result, not a crash
                final, val, status = float("nan"), float("nan"), f"diverged: {e}"
            rows.append({"method": method, "phi": phi, "l1": l1, "final_train_loss": final, "val_loss": val,
                         "steps": steps, "status": status})
    return rows
