"""A GPT with rotary positions and pluggable attention, in one readable file (in the spirit of nanoGPT).

    cfg = GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=128, attention="lssar", attention_options={"p": 15})
    model = GPT(cfg)
    logits, loss = model(idx, targets)              # idx [B, T] token ids, T may exceed the training length
    out = model.generate(idx, max_new_tokens=50)   # incremental decoding with a KV cache

Three choices matter for length extrapolation and are made here on purpose:

* **No learned positions.** Positions enter only through RoPE, applied to q and k before attention. The
  rotation for position t is computed from t itself (cos/sin tables are grown on demand), so the model runs at
  any length, including 16x the length it was trained at.
* **Attention only through** :func:`freeatten_core.attention`. The model never looks inside a method: every
  name in :data:`freeatten_core.METHODS` trains, with its options (``p``, ``offset_rows``, ``s``) passed through.
  Length-dependent scales (LSSA's ln d·ln N_i, SSMax's ln N_i) are computed by the method from the number of
  keys each query sees, so they follow the position automatically.
* **The KV cache uses the same call.** With a cache, the queries of the new tokens (Lq) attend to all cached
  keys plus their own (Lk >= Lq); ``causal=True`` aligns the queries to the *last* Lq keys (bottom-right), so
  query i sees N_i = Lk - Lq + i + 1 keys: exactly what the full forward gives that position.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention.ops import attention as attention_fn  # freeatten_core.attention; one operator under torch.compile
from .attention.methods import BACKENDS, resolve


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64  # the training length L; informational only, RoPE has no maximum length
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm (nanoGPT: False is a little better and faster)
    attention: str = "softmax"  # any name in freeatten_core.METHODS
    attention_options: dict = field(default_factory=dict)  # e.g. {"p": 15.0, "offset_rows": 3} for lssar
    backend: str = "auto"  # "auto" | "reference" | "triton"
    rope_base: float = 10000.0
    learn_ssmax_s: bool = True  # ssmax without an explicit s: learn one s per head (as in Scalable-Softmax)
    learn_qk_scale: bool = True  # softmax_qknorm without an explicit s: learn one s per head (Henry et al. 2020)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"the head dimension n_embd/n_head = {self.n_embd // self.n_head} must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; valid backends: {', '.join(BACKENDS)}")
        self.attention_options = dict(self.attention_options or {})
        resolve(self.attention, self.attention_options)  # raises with the valid methods / options

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ------------------------------------------------------------------------------------------------------------


ROPE_SCALINGS: tuple[str, ...] = ("none", "ntk", "yarn")
"""RoPE scaling kinds for :meth:`GPT.set_rope_scaling` (inference only: the weights are unchanged)."""

YARN_ALPHA, YARN_BETA = 1.0, 32.0  # YaRN's ramp bounds (Peng et al. 2023, the values used for LLaMA)


def check_rope_scaling(kind, factor) -> tuple[str, float]:
    """``(kind, factor)`` checked: kind in :data:`ROPE_SCALINGS`, factor a finite number >= 1."""
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"unknown RoPE scaling kind {kind!r}; valid kinds: {', '.join(ROPE_SCALINGS)}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"the RoPE scaling factor must be a finite number >= 1 (target length / training "
                         f"length), got {factor!r}")
    return kind, float(factor)


def rope_frequencies(head_dim: int, base: float, kind: str = "none", factor: float = 1.0,
                     original_length: int | None = None) -> tuple[torch.Tensor, float]:
    """The rotation frequencies θ_i (float64, ``[D/2]``) and the q/k multiplier m of RoPE, scaled for inference at
    ``factor`` (s) times the training length ``original_length`` (L). D = ``head_dim``, b = ``base``.

    * ``none``: θ_i = b^(−2i/D), m = 1 (Su et al. 2021, RoFormer).
    * ``ntk``: "NTK-aware" scaling (bloc97 2023; written out in Peng et al. 2023, YaRN, arXiv 2309.00071, §3.1):
      the base grows to b' = b·s^(D/(D−2)), so the highest frequency is unchanged and the lowest is divided by s;
      θ_i = b'^(−2i/D), m = 1.
    * ``yarn``: YaRN (Peng et al. 2023, §3.2–3.4, "NTK-by-parts" interpolation and attention temperature): with
      the wavelength λ_i = 2π/θ_i and r_i = L/λ_i rotations within the training length, the ramp
      γ_i = clamp((r_i − α)/(β − α), 0, 1) (α = 1, β = 32) and θ'_i = (1 − γ_i)·θ_i/s + γ_i·θ_i: dimensions that
      turn fewer than α times over L are interpolated (θ/s), more than β times are kept. Here written as
      θ'_i = θ_i·(1 + γ_i·(s − 1))/s, the same value, and exactly θ_i at s = 1. The softmax temperature
      √(1/t) = 0.1·ln s + 1 multiplies q and k (so q·k by 1/t). Methods that put q and k on the unit sphere
      (LSSA, LSSAR, QK-norm) are unaffected by m.

    At s = 1 every kind is the identity (θ_i and m = 1 exactly).
    """
    kind, factor = check_rope_scaling(kind, factor)
    i = torch.arange(0, head_dim, 2, dtype=torch.float64)
    if kind == "ntk":
        base = base * factor ** (head_dim / (head_dim - 2))
    theta = 1.0 / (base ** (i / head_dim))
    if kind != "yarn":
        return theta, 1.0
    if original_length is None or original_length < 1:
        raise ValueError(f"YaRN needs the training length (original_length >= 1), got {original_length!r}")
    r = original_length * theta / (2 * math.pi)
    gamma = ((r - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
    return theta * (1 + gamma * (factor - 1)) / factor, 0.1 * math.log(factor) + 1.0


class Rotary(nn.Module):
    """RoPE (Su et al. 2021), "rotate-half" layout: channel i pairs with channel i + D/2.

    The cos/sin table is a non-persistent buffer that grows whenever a longer position is asked for, so there
    is no maximum length, and checkpoints do not store it. :meth:`set_scaling` switches NTK-aware or YaRN
    scaling on (:func:`rope_frequencies`); ``forward(x, offset)`` rotates position ``offset + t``, and
    ``forward(x, positions=...)`` any positions (the streaming cache rotates by slot in the cache).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.scaling, self.mscale = ("none", 1.0), 1.0
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.register_buffer("cos", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim // 2), persistent=False)

    def set_scaling(self, kind: str = "none", factor: float = 1.0, original_length: int | None = None) -> None:
        """Use the frequencies of :func:`rope_frequencies` from now on (the cos/sin table is rebuilt)."""
        theta, self.mscale = rope_frequencies(self.head_dim, self.base, kind, factor, original_length)
        self.scaling = (kind, float(factor))
        self.inv_freq = theta.float().to(self.inv_freq.device)
        self.cos, self.sin = self.cos[:0], self.sin[:0]

    def _grow(self, length: int) -> None:
        n = max(length, 2 * self.cos.shape[0], 256)
        # float64 angles: positions far beyond the training length keep their precision
        t = torch.arange(n, dtype=torch.float64, device=self.inv_freq.device)
        angles = torch.outer(t, self.inv_freq.double())  # [n, D/2]
        self.cos, self.sin = angles.cos().float(), angles.sin().float()

    def forward(self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` ``[B, H, T, D]`` whose first position is ``offset`` (or whose positions are ``positions``,
        ``[T]`` integers)."""
        T = x.shape[-2]
        end = offset + T if positions is None else int(positions.max()) + 1
        if end > self.cos.shape[0] or self.cos.device != x.device:
            self._grow(end)
        if positions is None:
            cos = self.cos[offset:offset + T].to(x.dtype)  # [T, D/2]
            sin = self.sin[offset:offset + T].to(x.dtype)
        else:
            cos, sin = self.cos[positions].to(x.dtype), self.sin[positions].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return out if self.mscale == 1.0 else out * self.mscale


# ------------------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(self.head_dim, cfg.rope_base)
        # Scalable-Softmax learns its length scale s (one per head); the method itself only takes s as an option.
        self.ssmax_s = (nn.Parameter(torch.ones(cfg.n_head))
                        if cfg.attention == "ssmax" and "s" not in cfg.attention_options and cfg.learn_ssmax_s
                        else None)
        # QK-norm learns its scale s per head, initialised to log2(L² − L) (Henry et al. 2020), unless s is given.
        L = max(cfg.block_size, 2)
        self.qk_scale = (nn.Parameter(torch.full((cfg.n_head,), math.log2(L * L - L)))
                         if cfg.attention == "softmax_qknorm" and "s" not in cfg.attention_options
                         and cfg.learn_qk_scale else None)
        # What forward calls; GPT.set_attention may swap it (e.g. train LSSA, evaluate with LSSAR re-weighting).
        # Per layer, never through the config, which all layers share.
        self.method, self.options, self.backend = cfg.attention, dict(cfg.attention_options), cfg.backend

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None and cache.get("window") is not None:
            q, k, v = self._window_cache(q, k, v, cache)
        else:
            offset = 0 if cache is None or cache.get("k") is None else cache["k"].shape[2]
            q, k = self.rotary(q, offset), self.rotary(k, offset)
            if cache is not None:  # keys/values of earlier positions, already rotated
                if cache.get("k") is not None:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        options = dict(self.options)
        if self.method == "ssmax" and self.ssmax_s is not None and "s" not in options:
            options["s"] = self.ssmax_s.to(q.dtype)
        if self.method == "softmax_qknorm" and self.qk_scale is not None and "s" not in options:
            options["s"] = self.qk_scale.to(q.dtype)
        # Lq <= Lk with causal=True: queries are aligned to the last Lq keys (what the cache needs).
        y = attention_fn(q, k, v, method=self.method, causal=True, backend=self.backend, **options)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _window_cache(self, q, k, v, cache):
        """A bounded cache (StreamingLLM, Xiao et al. 2023): it keeps the first ``sinks`` entries and the most recent
        ``window - sinks``, unrotated; keys and the new queries are rotated by their slot in the cache, not by
        their position in the text. While nothing has been evicted, slot = position (the full forward)."""
        W, S = cache["window"], cache["sinks"]
        if cache.get("k") is not None:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        n, T = k.shape[2], q.shape[2]
        if n > W:
            if T > 1:
                raise ValueError(f"a windowed KV cache (window {W}) takes one token per step once it would "
                                 f"overflow; got {T} new tokens with {n - T} cached")
            k, v = (torch.cat([t[:, :, :S], t[:, :, n - (W - S):]], dim=2) for t in (k, v))
            n = W
        cache["k"], cache["v"] = k, v
        slots = torch.arange(n, device=k.device)
        return self.rotary(q, positions=slots[n - T:]), self.rotary(k, positions=slots), v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by 1/sqrt(2·n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied embedding is counted once

    def set_attention(self, method: str | None = None, options: dict | None = None,
                      backend: str | None = None) -> None:
        """Use another attention method and/or backend from now on (e.g. evaluate an LSSA model with LSSAR
        re-weighting, or run the reference instead of the fused kernels). ``None`` keeps the current value; a new
        ``method`` without ``options`` takes that method's defaults.

        The weights are unchanged; a learned SSMax s is used only while the method is ``ssmax``. ``self.cfg``
        (what the model was built and trained with) is not modified.
        """
        cur_method, cur_options = self.attention_method
        if method is None:
            method, options = cur_method, cur_options if options is None else options
        options = dict(options or {})
        resolve(method, options)
        backend = self.attention_backend if backend is None else backend
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
        for block in self.transformer.h:
            block.attn.method, block.attn.options, block.attn.backend = method, dict(options), backend

    @property
    def attention_method(self) -> tuple[str, dict]:
        attn = self.transformer.h[0].attn
        return attn.method, dict(attn.options)

    @property
    def attention_backend(self) -> str:
        return self.transformer.h[0].attn.backend

    def new_cache(self, window: int | None = None, sinks: int = 0) -> list[dict]:
        """An empty KV cache: one dict per layer, filled by :meth:`forward` with rotated keys and values.

        ``window``: a bounded cache of at most ``window`` entries per layer, of which the first ``sinks`` tokens of
        the text stay (attention sinks, Xiao et al. 2023, StreamingLLM) and the rest are the most recent tokens;
        positions are slots in the cache (see ``CausalSelfAttention._window_cache``). Once full, it takes one
        token per forward call.
        """
        if window is None:
            if sinks:
                raise ValueError(f"sinks ({sinks}) need a window: new_cache(window=W, sinks=s)")
            return [{} for _ in self.transformer.h]
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"the KV window must be an integer >= 1 (cached tokens per layer), got {window!r}")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or not 0 <= sinks < window:
            raise ValueError(f"sinks must be an integer with 0 <= sinks < window = {window}, got {sinks!r}")
        return [{"window": window, "sinks": sinks} for _ in self.transformer.h]

    def set_rope_scaling(self, kind: str = "none", factor: float = 1.0) -> None:
        """Scale RoPE for inference beyond the training length L = ``cfg.block_size``: ``"ntk"`` (NTK-aware base)
        or ``"yarn"`` (NTK-by-parts + temperature) at ``factor`` = target length / L; ``"none"`` (or factor 1)
        restores plain RoPE. Formulas and sources: :func:`rope_frequencies`. The weights are unchanged."""
        kind, factor = check_rope_scaling(kind, factor)
        for block in self.transformer.h:
            block.attn.rotary.set_scaling(kind, factor, self.cfg.block_size)

    @property
    def rope_scaling(self) -> tuple[str, float]:
        return self.transformer.h[0].attn.rotary.scaling

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list[dict] | None = None,
                reduction: str = "mean"):
        """Logits ``[B, T, vocab]`` and the cross-entropy (``None`` without targets).

        ``cache`` (from :meth:`new_cache`) makes this an incremental step: ``idx`` holds only the new tokens,
        which follow the cached ones. ``reduction="none"`` returns the per-token loss ``[B, T]``.
        """
        if idx.ndim != 2:
            raise ValueError(f"idx must be [batch, length] token ids, got shape {tuple(idx.shape)}")
        if cache is not None and len(cache) != len(self.transformer.h):
            raise ValueError(f"cache has {len(cache)} layers, the model has {len(self.transformer.h)}")
        x = self.transformer.drop(self.transformer.wte(idx))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i])
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
            if reduction == "none":
                loss = loss.view(targets.shape)
        return logits, loss

    def configure_optimizer(self, lr: float, weight_decay: float, betas=(0.9, 0.95), device_type: str = "cpu"):
        """AdamW; matrices decay, vectors (norms, biases, SSMax s) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        extra = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` ``[B, T]``; ``temperature=0`` is greedy."""
        cache = self.new_cache() if use_cache else None
        out, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_input if use_cache else out, cache=cache)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            step_input = nxt
        return out
