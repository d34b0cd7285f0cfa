"""Evaluation tasks: what a model can do at a given length, beyond its loss.

A task makes examples of a given length and scores a model on them::

    task = get_task("passkey")
    ex = task.make_examples(tokenizer, length=1024, n=32, seed=0)   # Examples: tokens [n, length] + what is scored
    task.score(model, ex)                                           # {"accuracy": ..., "loss": ..., ...}

Every task is teacher-forced: one forward pass over ``tokens``, and the model's greedy prediction of each
scored target token is compared with the target. A *span* is one answer (a pass key, one value of the recall
task); it is correct when every one of its tokens is. Tasks build their text from pieces encoded separately and
concatenated, so the answer tokens are the same whatever the tokenizer merges across piece boundaries.

The tasks (:data:`TASKS`, the one place to add one; see the book's "Contributing" page):

* ``loss``: the language-modelling loss on validation windows of ``length`` tokens: ``loss_window`` (mean over
  the window), ``loss_last`` (mean over its last L tokens, the ones beyond the training length) and
  ``loss_by_position``. Needs the corpus (``data=``) and ``length`` a multiple of the training length L.
* ``passkey``: a five-digit pass key hidden at a random depth of a filler text; the model must repeat it at
  the end (after Mohtashami & Jaggi 2023, with a shorter prompt). Accuracy by depth as well.
* ``recall``: multi-query associative recall: ``key:value`` pairs fill the context, then keys are queried in
  random order and the model must give each value (Arora et al. 2023, "Zoology").
* ``induction``: a random letter sequence of ``length/2`` tokens, then the same sequence again; the loss and
  accuracy on the second copy show whether the model copies from far back (Olsson et al. 2022). The loss on
  the first copy (unpredictable letters) is the baseline.
* ``streaming`` / ``streaming_nosink``: the loss of the same validation windows read token by token through a
  bounded KV cache of W = L entries (the training length) that keeps the first 4 tokens (attention sinks,
  Xiao et al. 2023, StreamingLLM) or none (plain window attention); :class:`StreamingTask` takes any W and
  number of sinks. With W >= the text length it is the full forward.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Examples:
    """``tokens`` ``[n, T]``: the model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``.

    ``span`` ``[n, T-1]``: for each target position, the answer it belongs to (``>= 0``, unique per example) or
    ``-1`` for targets that are not scored. ``meta``: per-example arrays (e.g. the depth of a pass key).
    """
    task: str
    tokens: torch.Tensor
    span: torch.Tensor
    meta: dict = field(default_factory=dict)
    block_size: int | None = None

    @property
    def length(self) -> int:
        return self.tokens.shape[1] - 1


def _check_count(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@torch.no_grad()
def forward_targets(model, tokens: torch.Tensor, batch_size: int = 16, device=None, dtype: str = "auto"):
    """Per-target loss and greedy correctness, both ``[n, T-1]`` on the CPU (float64 loss)."""
    from .runtime import autocast_for

    batch_size = _check_count("batch_size", batch_size)
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.eval()
    losses, correct = [], []
    for i in range(0, len(tokens), batch_size):
        w = tokens[i:i + batch_size].to(device)
        with autocast_for(device, dtype):
            logits, loss = model(w[:, :-1], w[:, 1:], reduction="none")
        losses.append(loss.double().cpu())
        correct.append((logits.argmax(-1) == w[:, 1:]).cpu())
    loss, correct = torch.cat(losses), torch.cat(correct)
    bad = (~torch.isfinite(loss)).nonzero()
    if len(bad):
        r, c = (int(x) for x in bad[0])
        raise FloatingPointError(f"the loss of example {r} is {float(loss[r, c])} at position {c} of "
                                 f"{loss.shape[1]} ({len(bad)} values are not finite): the model or its attention "
                                 f"produces NaN/Inf on these inputs")
    return loss, correct


def span_accuracy(correct: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``[n, S]`` booleans: is span s of example i entirely correct (``S`` = spans per example)."""
    n_spans = int(span.max()) + 1
    out = torch.ones(correct.shape[0], n_spans, dtype=torch.bool)
    for s in range(n_spans):
        m = span == s
        out[:, s] = (correct | ~m).all(1)
    return out


class Task:
    """The interface. ``name`` keys :data:`TASKS`; ``needs_data``: the task reads the validation corpus;
    ``length_multiple_of_L``: ``length`` must be k·L."""
    name = "task"
    needs_data = False
    length_multiple_of_L = False

    def make_examples(self, tokenizer, length: int, n: int, seed: int, *, data=None, block_size=None) -> Examples:
        raise NotImplementedError

    def score(self, model, examples: Examples, batch_size: int = 16, device=None, dtype: str = "auto") -> dict:
        loss, correct = forward_targets(model, examples.tokens, batch_size, device, dtype)
        scored = examples.span >= 0
        spans = span_accuracy(correct, examples.span)
        return {"length": examples.length, "examples": int(len(examples.tokens)),
                "accuracy": float(spans.double().mean()), "loss": float(loss[scored].mean()),
                "answers": int(spans.numel()), "correct": int(spans.sum())}

    def check_length(self, length, block_size=None) -> int:
        length = _check_count(f"the length of task {self.name!r}", length, 2)
        if self.length_multiple_of_L:
            if block_size is None:
                raise ValueError(f"task {self.name!r} needs the training length L (block_size)")
            if length % block_size:
                raise ValueError(f"task {self.name!r} needs lengths that are a multiple of the training length "
                                 f"L = {block_size} (k·L); got {length}")
        return length


# ------------------------------------------------------------------------------------------------------------
# The language-modelling loss at k·L
# ------------------------------------------------------------------------------------------------------------

class LossTask(Task):
    name = "loss"
    needs_data = True
    length_multiple_of_L = True

    def make_examples(self, tokenizer, length, n, seed, *, data=None, block_size=None) -> Examples:
        from .data import val_windows

        length = self.check_length(length, block_size)
        n = _check_count("n (windows)", n)
        if data is None:
            raise ValueError("task 'loss' needs the validation corpus (data=TokenData)")
        if tokenizer is not None and data.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"the corpus has a vocabulary of {data.vocab_size} tokens, the tokenizer "
                             f"{tokenizer.vocab_size}")
        tokens = torch.from_numpy(val_windows(data.val, length, n))  # [n, length + 1], same regions at every k
        return Examples(self.name, tokens, torch.zeros(len(tokens), length, dtype=torch.long), {}, block_size)

    def score(self, model, examples, batch_size=16, device=None, dtype="auto") -> dict:
        loss, _ = forward_targets(model, examples.tokens, batch_size, device, dtype)
        per_pos = loss.mean(0)
        L = examples.block_size
        return {"factor": examples.length // L, "length": examples.length, "windows": int(len(loss)),
                "loss_window": float(per_pos.mean()), "loss_last": float(per_pos[-L:].mean()),
                "loss_by_position": [round(float(x), 5) for x in per_pos]}


# ------------------------------------------------------------------------------------------------------------
# Streaming: the loss of a long text read through a bounded KV cache, with and without attention sinks
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def stream_losses(model, tokens: torch.Tensor, window: int, sinks: int = 0, batch_size: int = 16, device=None,
                  dtype: str = "auto") -> torch.Tensor:
    """Per-target loss ``[n, T-1]`` (float64, CPU) of ``tokens`` ``[n, T]`` read through a KV cache of at most
    ``window`` entries per layer, the first ``sinks`` of them the first tokens of the text
    (:meth:`freeatten_core.model.GPT.new_cache`): the first ``window`` tokens in one forward pass, then one token
    per step. Positions are slots in the cache, so no query is ever rotated beyond ``window``."""
    from .runtime import autocast_for

    batch_size = _check_count("batch_size", batch_size)
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.eval()
    out = []
    for i in range(0, len(tokens), batch_size):
        w = tokens[i:i + batch_size].to(device)
        x, y = w[:, :-1], w[:, 1:]
        cache = model.new_cache(window=window, sinks=sinks)
        first = min(window, x.shape[1])
        with autocast_for(device, dtype):
            logits = [model(x[:, :first], cache=cache)[0]]
            for t in range(first, x.shape[1]):
                logits.append(model(x[:, t:t + 1], cache=cache)[0])
        logits = torch.cat(logits, 1)
        logits = logits if logits.dtype == torch.float64 else logits.float()  # as the model's own loss
        out.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).double().cpu())
    loss = torch.cat(out)
    if not torch.isfinite(loss).all():
        r, c = (int(v) for v in (~torch.isfinite(loss)).nonzero()[0])
        raise FloatingPointError(f"the streamed loss of example {r} is {float(loss[r, c])} at position {c}: the "
                                 f"model or its attention produces NaN/Inf on these inputs")
    return loss


class StreamingTask(Task):
    """The ``loss`` task's validation windows of ``length`` = k·L tokens, read through a bounded KV cache of
    ``window`` entries (default: L, the training length) that keeps the first ``sinks`` tokens. Reports the same
    numbers as ``loss`` (``loss_window``, ``loss_last``, ``loss_by_position``), so the two compare directly."""
    needs_data = True
    length_multiple_of_L = True

    def __init__(self, name: str = "streaming", window: int | None = None, sinks: int = 4):
        if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral)
                                   or window < 1):
            raise ValueError(f"the streaming window must be an integer >= 1 (cached tokens), got {window!r}")
        if isinstance(sinks, bool) or not isinstance(sinks, numbers.Integral) or sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {sinks!r}")
        if window is not None and sinks >= window:
            raise ValueError(f"sinks ({sinks}) must be fewer than the window ({window})")
        self.name, self.window, self.sinks = name, window, int(sinks)

    def make_examples(self, tokenizer, length, n, seed, *, data=None, block_size=None) -> Examples:
        ex = LossTask().make_examples(tokenizer, length, n, seed, data=data, block_size=block_size)
        window = block_size if self.window is None else self.window
        if self.sinks >= window:
            raise ValueError(f"task {self.name!r}: sinks ({self.sinks}) must be fewer than the window ({window})")
        return Examples(self.name, ex.tokens, ex.span, {"window": window, "sinks": self.sinks}, block_size)

    def score(self, model, examples, batch_size=16, device=None, dtype="auto") -> dict:
        W, S = examples.meta["window"], examples.meta["sinks"]
        per_pos = stream_losses(model, examples.tokens, W, S, batch_size, device, dtype).mean(0)
        L = examples.block_size
        return {"factor": examples.length // L, "length": examples.length, "windows": int(len(examples.tokens)),
                "window": W, "sinks": S, "loss_window": float(per_pos.mean()), "loss_last": float(per_pos[-L:].mean()),
                "loss_by_position": [round(float(x), 5) for x in per_pos]}


# ------------------------------------------------------------------------------------------------------------
# Synthetic retrieval tasks (no corpus: the text is generated from the seed)
# ------------------------------------------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"the tokenizer encodes {text!r} to no tokens")
    return list(ids)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class PasskeyTask(Task):
    """Filler text, ``The pass key is NNNNN.`` at a random depth, more filler, then ``The pass key is`` and the
    key (scored; short enough for byte-level models trained at L = 64: 46 tokens of fixed text)."""
    name = "passkey"
    digits = 5

    def make_examples(self, tokenizer, length, n, seed, *, data=None, block_size=None) -> Examples:
        length = self.check_length(length, block_size)
        n = _check_count("n (examples)", n)
        rng = np.random.default_rng([seed, length, 1])
        filler = _encode(tokenizer, FILLER)
        question = _encode(tokenizer, " The pass key is")
        rows, spans, depths = [], [], []
        for _ in range(n):
            key = "".join(str(d) for d in rng.integers(0, 10, self.digits))
            key_ids = _encode(tokenizer, " " + key)
            needle = _encode(tokenizer, f" The pass key is {key}. ")
            room = length + 1 - len(needle) - len(question) - len(key_ids)
            if room < 1:
                raise ValueError(f"task 'passkey' needs at least {length + 2 - room} tokens, got length {length}")
            hay = (filler * (room // len(filler) + 1))[:room]
            depth = float(rng.uniform(0, 1))
            at = int(round(depth * room))
            row = hay[:at] + needle + hay[at:] + question + key_ids
            span = [-1] * length
            for j in range(len(key_ids)):
                span[length - len(key_ids) + j] = 0  # target position t predicts token t + 1
            rows.append(row), spans.append(span), depths.append(at / max(1, room))
        return Examples(self.name, torch.tensor(rows), torch.tensor(spans), {"depth": np.array(depths)}, block_size)

    def score(self, model, examples, batch_size=16, device=None, dtype="auto", depth_bins: int = 5) -> dict:
        loss, correct = forward_targets(model, examples.tokens, batch_size, device, dtype)
        ok = span_accuracy(correct, examples.span)[:, 0].double()
        depth = np.asarray(examples.meta["depth"])
        bins = np.minimum((depth * depth_bins).astype(int), depth_bins - 1)
        by_depth = [float(ok[torch.from_numpy(bins == b)].mean()) if (bins == b).any() else None
                    for b in range(depth_bins)]
        return {"length": examples.length, "examples": int(len(ok)), "accuracy": float(ok.mean()),
                "loss": float(loss[examples.span >= 0].mean()), "answers": int(len(ok)), "correct": int(ok.sum()),
                "accuracy_by_depth": by_depth, "depth_bins": depth_bins}


class RecallTask(Task):
    """``key:value`` pairs (two-letter keys, one-digit values) separated by spaces fill the context; after a
    ``|`` up to ``queries`` pairs (a third of the room at short lengths) repeat earlier keys (chosen at random, each once) with their value: each
    value is one scored answer. Chance is 1/10 for a model that has learned the format. Spaces in front pad
    every example to exactly ``length`` tokens."""
    name = "recall"
    queries = 8

    def make_examples(self, tokenizer, length, n, seed, *, data=None, block_size=None) -> Examples:
        length = self.check_length(length, block_size)
        n = _check_count("n (examples)", n)
        rng = np.random.default_rng([seed, length, 2])
        letters = "abcdefghijklmnopqrstuvwxyz"
        key_ids = {a + b: _encode(tokenizer, " " + a + b + ":") for a in letters for b in letters}
        val_ids = [_encode(tokenizer, str(d)) for d in range(10)]
        sep, space = _encode(tokenizer, " |"), _encode(tokenizer, " ")
        longest = max(map(len, key_ids.values())) + max(map(len, val_ids))
        queries = min(self.queries, (length + 1 - len(sep)) // longest // 3)  # at least 2 pairs per query
        if queries < 1:
            raise ValueError(f"task 'recall' needs more than {length} tokens (at least {3 * longest + len(sep)})")
        budget = length + 1 - len(sep) - queries * longest
        rows, spans = [], []
        for _ in range(n):
            keys = list(key_ids)
            rng.shuffle(keys)
            row, pairs = [], []
            for key in keys:  # context pairs while the queries still fit
                value = int(rng.integers(0, 10))
                piece = key_ids[key] + val_ids[value]
                if len(row) + len(piece) > budget:
                    break
                row += piece
                pairs.append((key, value))
            row += sep
            answers = []
            for q, idx in enumerate(rng.choice(len(pairs), queries, replace=False)):
                key, value = pairs[idx]
                row += key_ids[key]
                answers += [(len(row) + j, q) for j in range(len(val_ids[value]))]  # token index, answer
                row += val_ids[value]
            pad = length + 1 - len(row)
            row = (space * pad)[:pad] + row
            span = [-1] * length
            for t, q in answers:
                span[pad + t - 1] = q  # target position t - 1 predicts token t
            rows.append(row), spans.append(span)
        return Examples(self.name, torch.tensor(rows), torch.tensor(spans), {"queries": queries}, block_size)


class InductionTask(Task):
    """A random sequence of ``length/2`` lower-case letters (one token each with the byte tokenizer), then the
    same sequence again. Scored: every target of the second copy except its first token; also reported: the
    loss on the first copy, which no model can predict (the baseline, ln 26 for a perfect model of the
    alphabet)."""
    name = "induction"

    def make_examples(self, tokenizer, length, n, seed, *, data=None, block_size=None) -> Examples:
        length = self.check_length(length, block_size)
        n = _check_count("n (examples)", n)
        if length % 2 or length < 4:
            raise ValueError(f"task 'induction' needs an even length >= 4 (two copies), got {length}")
        rng = np.random.default_rng([seed, length, 3])
        letters = [_encode(tokenizer, c) for c in "abcdefghijklmnopqrstuvwxyz"]
        if any(len(x) != 1 for x in letters):
            raise ValueError("task 'induction' needs a tokenizer that encodes each letter as one token")
        alphabet = torch.tensor([x[0] for x in letters])
        half = (length + 1) // 2 + 1
        seq = alphabet[torch.from_numpy(rng.integers(0, 26, (n, half)))]
        tokens = torch.cat([seq, seq], 1)[:, :length + 1]
        span = torch.full((n, length), -1, dtype=torch.long)
        idx = torch.arange(half, length)  # targets half + 1 ... length: the second copy after its first token
        span[:, idx] = torch.arange(len(idx))
        return Examples(self.name, tokens, span, {"half": half}, block_size)

    def score(self, model, examples, batch_size=16, device=None, dtype="auto") -> dict:
        loss, correct = forward_targets(model, examples.tokens, batch_size, device, dtype)
        second = examples.span >= 0
        first = torch.zeros_like(second)
        first[:, :examples.meta["half"] - 1] = True
        return {"length": examples.length, "examples": int(len(loss)),
                "accuracy": float(correct[second].double().mean()), "loss": float(loss[second].mean()),
                "loss_first_copy": float(loss[first].mean()),
                "answers": int(second.sum()), "correct": int(correct[second].sum())}


# ------------------------------------------------------------------------------------------------------------
# The registry: add a task here (a Task subclass with make_examples and score) and everything else finds it
# ------------------------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {t.name: t for t in (LossTask(), PasskeyTask(), RecallTask(), InductionTask(),
                                                StreamingTask("streaming", sinks=4),
                                                StreamingTask("streaming_nosink", sinks=0))}


def get_task(name) -> Task:
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def check_tasks(names) -> tuple[str, ...]:
    """A non-empty list of distinct task names (raises naming the unknown one and the valid names)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"tasks must be a non-empty list of task names ({', '.join(TASKS)}), got {names!r}")
    for n in names:
        get_task(n)
    if len(set(names)) != len(names):
        raise ValueError(f"tasks must not repeat a name, got {list(names)}")
    return tuple(names)


# ------------------------------------------------------------------------------------------------------------
# Oracles: models that are known to solve (or to be at chance on) the tasks, for the tests and the book
# ------------------------------------------------------------------------------------------------------------

class InductionOracle(torch.nn.Module):
    """Predicts the token that followed the first earlier occurrence of the longest suffix (up to ``order``
    tokens) of the input: a literal induction head. It solves ``passkey``, ``recall`` and ``induction`` at any
    length; its logits are ``margin`` for the prediction and 0 elsewhere (uniform when nothing matches)."""

    def __init__(self, vocab_size: int, order: int = 8, margin: float = 30.0):
        super().__init__()
        self.vocab_size, self.order, self.margin = vocab_size, order, margin
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, so the runner finds a device

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size, device=idx.device)
        for b in range(B):
            seq = idx[b].tolist()
            for t in range(T):
                for m in range(min(self.order, t), 0, -1):  # longest suffix seq[t-m+1 .. t] seen before
                    suffix = seq[t - m + 1:t + 1]
                    hit = next((s for s in range(0, t - m + 1) if seq[s:s + m] == suffix), None)
                    if hit is not None and hit + m <= t:
                        logits[b, t, seq[hit + m]] = self.margin
                        break
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
            loss = loss.view(targets.shape) if reduction == "none" else loss
        return logits, loss


class UniformModel(InductionOracle):
    """Uniform logits: chance on every task (loss ln V, accuracy of the argmax = that of token 0)."""

    def forward(self, idx, targets=None, reduction="mean"):
        logits = torch.zeros(*idx.shape, self.vocab_size, device=idx.device)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
            loss = loss.view(targets.shape) if reduction == "none" else loss
        return logits, loss


def chance_loss(vocab_size: int) -> float:
    return math.log(vocab_size)
