"""Fused Triton kernels for LSSA / LSSAR (forward and backward).

Contract with :mod:`freeatten_core.attention.api`:
  unsupported_reason(q, k, v, explicit) -> str | None   why the kernels cannot run this call (None: they can).
      ``explicit`` is True for backend="triton"; "auto" (explicit=False) should only pick the kernels on CUDA.
  attention(q, k, v, method, causal, p=15.0, offset_rows=3) -> Tensor   differentiable, input dtype out.
Importing this module may raise ImportError (e.g. triton missing): the API then falls back / explains.
"""

raise ImportError("the fused Triton kernels are not part of this version yet")
