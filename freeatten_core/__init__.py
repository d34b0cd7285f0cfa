"""freeatten_core: Softplus attention with re-weighting (LSSA / LSSAR), its ablations and baselines.

    import freeatten_core as fa
    out = fa.attention(q, k, v, method="lssar", causal=True, backend="auto", p=15.0)   # [B, H, Lq, D]
    w   = fa.attention_weights(q, k, method="lssar", causal=True, p=15.0)              # [B, H, Lq, Lk]
    fa.METHODS                                                                          # the method names
"""

from .attention import BACKENDS, FUSED_METHODS, METHODS, REGISTRY, attention, attention_weights, method_table

__version__ = "0.1.0"

__doc__ += "\nMethods:\n\n" + method_table() + "\n"

__all__ = ["attention", "attention_weights", "METHODS", "BACKENDS", "FUSED_METHODS", "REGISTRY", "method_table"]
