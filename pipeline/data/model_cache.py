"""Build-once model directories under the covrl cache (``$COVRL_CACHE`` or ``~/.cache/covrl``).

Why one helper: the embedded tiny model and the real-tokenizer fixture are both built locally (no hub
here), once per settings hash, and may be requested by several processes at once (pytest workers, Ray
actors). ``ensure_built`` holds ``<key>.lock``, builds into a temp dir and publishes it by an atomic
rename, so a reader never sees a half-written model and a waiting process finds the finished one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """``$COVRL_CACHE`` or ``~/.cache/covrl``."""
    return Path(os.environ.get("COVRL_CACHE") or Path.home() / ".cache" / "covrl").expanduser()


def settings_key(identity: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able dict of everything that determines a built model."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def ensure_built(kind: str, key: str, marker: str, build: Callable[[Path], Any]) -> Path:
    """``cache_root()/kind/key``, calling ``build(tmp_dir)`` first when ``marker`` is not there yet.

    ``build`` must write ``marker`` last: its presence is what makes a directory complete.
    """
    base = cache_root() / kind
    final = base / key
    if (final / marker).is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    with _file_lock(base / f"{key}.lock"):
        if (final / marker).is_file():
            return final
        if final.exists():  # a half-published dir cannot happen (rename), but a manual copy can
            shutil.rmtree(final)
        for stale in base.glob(f".{key}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{key}.tmp-"))
        try:
            build(tmp)
            if not (tmp / marker).is_file():
                raise RuntimeError(f"building {kind}/{key} wrote no {marker}")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
