"""freeatten_core: Softplus attention with re-weighting (LSSA / LSSAR), its ablations and baselines.

    import freeatten_core as fa
    out = fa.attention(q, k, v, method="lssar", causal=True, backend="auto", p=15.0)   # [B, H, Lq, D]
    w   = fa.attention_weights(q, k, method="lssar", causal=True, p=15.0)              # [B, H, Lq, Lk]
    fa.METHODS                                                                          # the method names
    layer = fa.AttentionLayer(embed_dim=256, num_heads=8, num_kv_heads=2, rope=10000.0)  # [B, L, E] -> [B, L, E]
"""

from .attention import BACKENDS, FUSED_METHODS, METHODS, REGISTRY, attention, attention_weights, method_table
from .attention.layer import AttentionLayer

__version__ = "0.1.0"

__doc__ += "\nMethods:\n\n" + method_table() + "\n"

__all__ = ["attention", "attention_weights", "AttentionLayer", "METHODS", "BACKENDS", "FUSED_METHODS", "REGISTRY",
           "method_table"]
