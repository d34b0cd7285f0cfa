"""Training: schedule, exact resume, atomic checkpoints, DDP (gloo, 2 processes) = gradient accumulation, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from freeatten_core import bench
from freeatten_core import checkpoint as C
from freeatten_core import train as T
from freeatten_core.data import TokenData

TINY = dict(block_size=16, n_layer=1, n_head=2, n_embd=32)


def synthetic(vocab=64, n=6000, seed=0):
    rng = np.random.default_rng(seed)
    # a learnable stream: a noisy repeating pattern
    base = np.tile(np.arange(vocab), n // vocab + 1)[:n]
    noise = rng.integers(0, vocab, n)
    train = np.where(rng.random(n) < 0.2, noise, base).astype(np.uint8)
    return TokenData(train=train, val=[train[:800].copy(), train[800:1800].copy()], vocab_size=vocab,
                     tokenizer="byte", corpus="synthetic")


def cfg(tmp, **kw):
    base = dict(out_dir=str(tmp), model=dict(TINY), batch_size=4, max_steps=12, warmup_steps=3, ckpt_interval=4,
                log_interval=1, progress=False, attention="lssar", lr=3e-3, min_lr=3e-4)
    base.update(kw)
    return T.TrainConfig(**base)


def log_losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, Path(path, "log.jsonl").read_text().splitlines())]


def test_lr_schedule():
    c = T.TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert T.lr_at(0, c) == pytest.approx(0.1) and T.lr_at(9, c) == pytest.approx(1.0)
    assert T.lr_at(10, c) == pytest.approx(1.0) and T.lr_at(100, c) == pytest.approx(0.1)
    assert 0.1 < T.lr_at(55, c) < 1.0
    lrs = [T.lr_at(s, c) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_training_lowers_the_loss(tmp_path):
    s = T.train(cfg(tmp_path, max_steps=40, attention="lssa"), data=synthetic())
    assert s["steps"] == 40 and np.mean(s["losses"][-5:]) < np.mean(s["losses"][:5]) - 0.3


def test_resume_continues_the_same_loss_trajectory(tmp_path):
    data = synthetic()
    straight = T.train(cfg(tmp_path / "a"), data=data)["losses"]
    # a run killed after 10 steps: its last checkpoint is at step 8, so 2 steps are lost and redone
    first = T.train(cfg(tmp_path / "b"), data=data, stop_after=10)
    assert len(first["losses"]) == 10
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 8
    resumed = T.train(cfg(tmp_path / "b"), data=data)
    assert resumed["steps"] == 12 and resumed["losses"] == straight  # bit-identical on CPU
    logged = log_losses(tmp_path / "b")
    assert [s for s, _ in logged] == list(range(12))  # the 2 redone steps are logged once
    assert [x for _, x in logged] == pytest.approx(straight, abs=0, rel=0)
    # a finished run resumed again does nothing
    again = T.train(cfg(tmp_path / "b"), data=data)
    assert again["losses"] == straight
    assert not list((tmp_path / "b").glob("*.tmp"))  # atomic writes leave no temporaries


def test_gradient_accumulation_and_clipping_run(tmp_path):
    s = T.train(cfg(tmp_path, max_steps=3, grad_accum=2, grad_clip=0.5, attention="softmax",
                    dtype="bfloat16"), data=synthetic())
    assert s["steps"] == 3 and all(np.isfinite(s["losses"]))


def test_resume_refuses_another_model(tmp_path):
    T.train(cfg(tmp_path, max_steps=2), data=synthetic())
    with pytest.raises(ValueError, match="different model"):
        T.train(cfg(tmp_path, max_steps=4, model=dict(TINY, n_embd=64)), data=synthetic())


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        C.load_model(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        C.load_model(tmp_path / "garbage.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a freeatten_core checkpoint"):
        C.load_model(tmp_path / "foreign.pt")


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        T.config_from_preset("huge")
    with pytest.raises(ValueError, match="unknown training option"):
        T.config_from_preset("ci", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown model field"):
        T.config_from_preset("ci", model={"layers": 3})
    with pytest.raises(ValueError, match="unknown option"):
        T.config_from_preset("ci", attention="lssar", attention_options={"power": 3})
    paper = T.config_from_preset("paper")
    assert (paper.lr, paper.min_lr, paper.warmup_steps, paper.max_steps, paper.weight_decay) == \
        (6e-4, 6e-5, 715, 18865, 0.1)
    assert paper.batch_size * 8 * paper.block_size * paper.grad_accum == 524288


def test_cli_errors(capsys):
    assert T.main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert T.main(["--method", "softmaxx"]) == 2
    assert "unknown attention method 'softmaxx'" in capsys.readouterr().err
    assert T.main(["--method", "lssar", "--option", "q=3"]) == 2
    assert "unknown option(s) q" in capsys.readouterr().err


def test_throughput_helper():
    r = bench.measure_throughput(T.config_from_preset("ci", model=TINY, attention="lssar").model_config(256),
                             batch_size=2, steps=2, warmup=1, device="cpu")
    assert r["tokens_per_s"] > 0 and r["attention"] == "lssar" and r["block_size"] == 16


def test_ddp_gloo_two_processes_equals_accumulation(tmp_path):
    """torchrun with 2 CPU processes (gloo) takes the same steps as one process accumulating 2 micro-batches."""
    common = ["--preset", "ci", "--method", "lssar", "--steps", "4", "--batch-size", "4", "--no-progress",
              "--model", "n_layer=1", "--model", "n_embd=32", "--model", "n_head=2", "--model", "block_size=16",
              "--set", "log_interval=1", "--set", "warmup_steps=2", "--ckpt-interval", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "freeatten_core", "train", *common, "--out-dir", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert T.main([*common, "--grad-accum", "2", "--out-dir", str(tmp_path / "one")]) == 0
    ddp, one = log_losses(tmp_path / "ddp"), log_losses(tmp_path / "one")
    assert [s for s, _ in ddp] == [0, 1, 2, 3]
    np.testing.assert_allclose([x for _, x in ddp], [x for _, x in one], rtol=1e-5)
    a = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_measure_throughput():
    r = bench.measure_throughput(T.GPTConfig(vocab_size=64, **TINY, attention="softmax"), batch_size=2, steps=1,
                             warmup=1, device="cpu")
    assert r["backend"] == "auto" and r["tokens_per_s"] > 0 and r["block_size"] == TINY["block_size"]


def test_cli_resume_with_another_model_is_an_error_not_a_traceback(tmp_path, capsys):
    args = ["--preset", "ci", "--steps", "1", "--batch-size", "2", "--no-progress", "--out-dir", str(tmp_path),
            "--model", "n_layer=1", "--model", "n_embd=32", "--model", "n_head=2", "--model", "block_size=16"]
    assert T.main(args) == 0
    capsys.readouterr()
    other = [a if a != "n_head=2" else "n_head=4" for a in args]
    assert T.main(other) == 1  # same run directory, another model
    assert "different model" in capsys.readouterr().err
    assert T.main([*args, "--model", "n_head=4"]) == 2  # a field given twice is an error, not "the last wins"
    assert "n_head is given twice" in capsys.readouterr().err
