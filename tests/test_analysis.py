"""Analysis tools and the command line's method listing."""

import math
import subprocess
import sys

import torch

import freeatten_core as fa
from freeatten_core.analysis import entropy_vs_length, mass_above_uniform, max_weight, needle_inputs, row_entropy


def test_row_statistics():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(row_entropy(w), torch.tensor([math.log(4), 0.0, math.log(2)]))
    torch.testing.assert_close(max_weight(w), torch.tensor([0.25, 1.0, 0.5]))
    torch.testing.assert_close(mass_above_uniform(w), torch.tensor([0.0, 1.0, 1.0]))


def test_needle_has_the_requested_cosine():
    q, k = needle_inputs(50, 16, 1, cos=0.3, seed=1, away=0.5)
    cos = torch.nn.functional.cosine_similarity(q[0, 0, 0], k[0, 0], dim=-1)
    assert abs(cos[0].item() - 0.3) < 1e-12
    assert cos[1:].mean() < -0.2  # distractors point away


def test_entropy_vs_length_records():
    methods = {"softmax": ("softmax", {}), "LSSAR": ("lssar", {"p": 15.0})}
    recs = entropy_vs_length(methods, [8, 64], d=16, n_queries=4)
    assert [(r["label"], r["N"]) for r in recs] == [("softmax", 8), ("LSSAR", 8), ("softmax", 64), ("LSSAR", 64)]
    for r in recs:
        assert 0 <= r["entropy"] <= math.log(r["N"]) + 1e-9
        assert 0 < r["max_weight"] <= 1
    # the re-weighting concentrates: lower entropy than softmax on the same rows
    assert recs[1]["entropy"] < recs[0]["entropy"] and recs[3]["entropy"] < recs[2]["entropy"]


def test_cli_methods():
    out = subprocess.run([sys.executable, "-m", "freeatten_core", "methods"], capture_output=True, text=True,
                         check=True).stdout
    assert all(f"`{m}`" in out for m in fa.METHODS)
    bad = subprocess.run([sys.executable, "-m", "freeatten_core", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
