"""Attention methods: the plain-PyTorch reference (the specification) and the fused kernels."""

from .api import attention, attention_weights
from .methods import BACKENDS, FUSED_METHODS, METHODS, REGISTRY, method_table

__all__ = ["attention", "attention_weights", "METHODS", "BACKENDS", "FUSED_METHODS", "REGISTRY", "method_table"]
