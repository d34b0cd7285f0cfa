"""Writing files so that no failure loses work or leaves debris: one atomic writer, output-path checks made
before any work starts, and the clean-up of temporaries left by killed processes.

Every file the package writes (checkpoints, logs, evaluation and benchmark JSON, figures, data caches) goes
through :func:`atomic_write`: the content is written to ``<name>.<pid>-<random>.tmp`` in the target's directory
and moved over the target with ``os.replace`` once complete. A reader therefore sees the old file or the new
one, never half of one; an exception removes the temporary; a process killed mid-write leaves a temporary
whose ``pid`` is dead, and :func:`remove_stale_temporaries` (called when a run, an evaluation or a cache build
starts) deletes it. Temporaries of *live* processes are left alone, so concurrent writers (``pytest -n 2``
building the same cache) never delete each other's work.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

_TMP = re.compile(r"\.(\d+)-[A-Za-z0-9_]+\.tmp$")  # <name>.<pid>-<random>.tmp
# temporaries of versions before the pid was in the name: <name>.<random>.tmp, tmp<random>.npy / .bin.tmp
_LEGACY_TMP = re.compile(r"(\.[a-z0-9_]{8}\.tmp|^tmp[a-z0-9_]{8}(\.npy|\.bin\.tmp))$")


class OutputPathError(ValueError):
    """An output path that cannot be written; raised before any work starts."""


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", encoding: str | None = "utf-8", perms: int = 0o644):
    """``with atomic_write(path, "wb") as f: ...``: ``f`` is a temporary file beside ``path`` that replaces
    ``path`` when the block ends without an exception, and is deleted otherwise.

    ``mode``: ``"w"`` (text) or ``"wb"`` (bytes). ``perms``: the file mode of the result (``mkstemp`` would make
    it 0600). The parent directory is created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, perms)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_bytes(path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def finite_json(obj):
    """``obj`` with every non-finite float replaced by ``None``: JSON has no NaN, and a bare ``NaN`` in a file
    is invalid for most readers. Callers that must not produce a NaN check for it first."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj, indent: int | None = 1, default=None) -> str:
    """Strict JSON (``allow_nan=False``) of ``obj`` after :func:`finite_json`."""
    if default is not None:  # convert numpy scalars / tensors first, so their NaNs are caught too
        obj = json.loads(json.dumps(obj, default=default))
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def write_json(path, obj, default=None) -> None:
    write_text(path, dumps_json(obj, default=default) + "\n")


def torch_save(obj, path) -> None:
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def save_npy(path, arr) -> None:
    import numpy as np

    with atomic_write(path, "wb") as f:
        np.save(f, arr)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory, name: str | None = None) -> list[Path]:
    """Delete the temporaries of :func:`atomic_write` in ``directory`` (only those of target ``name`` when
    given) whose writing process is no longer alive, and those of earlier versions (no pid in the name);
    return what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        m = _TMP.search(p.name)
        legacy = m is None and _LEGACY_TMP.search(p.name) is not None
        if not (m or legacy) or (name is not None and not p.name.startswith(name + ".")) or not p.is_file():
            continue
        if legacy or not _pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------------------
# Output paths, checked before the work that produces the output
# ------------------------------------------------------------------------------------------------------------

def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path, what: str = "output directory") -> Path:
    """Raise :class:`OutputPathError` unless ``path`` is (or can be created as) a writable directory."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} exists and is not a directory")
    base = _first_existing(path.absolute())
    if not base.is_dir():
        raise OutputPathError(f"{what} {path} cannot be created: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path} is not writable (no write permission in {base})")
    return path


def check_output_file(path, what: str = "output file") -> Path:
    """Raise :class:`OutputPathError` unless a file can be written at ``path`` (not a directory, parent
    creatable and writable)."""
    path = Path(path).expanduser()
    if str(path).endswith(os.sep) or path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; give a file path, e.g. {path / 'results.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{what} {path} exists and is not writable")
    check_output_dir(path.parent, what=f"the directory of {what}")
    return path
