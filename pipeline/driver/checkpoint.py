"""Atomic checkpoint directories and the driver's resumable state (no Ray, no DeepSpeed here).

Layout under ``RUN_DIR/checkpoints``::

    step_000020/            complete checkpoint (learner/ from DeepSpeed + driver_state.json)
    step_000040.partial/    being written; never read; removed on the next start
    latest                  text file naming the newest *complete* checkpoint (replaced atomically)

A checkpoint is written into ``*.partial`` and renamed only once every piece is on disk, then
``latest`` is replaced by write-temp-and-rename: a crash at any point leaves the previous checkpoint
and pointer intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LATEST = "latest"
STATE_FILE = "driver_state.json"


@dataclass
class DriverState:
    step: int  # last completed step
    policy_version: int
    data_state: dict[str, Any]
    rng_seed: int
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says where and why."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def begin(run_dir: str | Path, step: int) -> Path:
    """Create the ``.partial`` directory for ``step`` (clearing any leftover one)."""
    root = checkpoint_root(run_dir)
    partial = root / f"step_{step:06d}.partial"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot create checkpoint directory {partial}: {e.strerror or e}") from e
    return partial


def commit(partial: Path, state: DriverState, *, keep: int) -> Path:
    """Write the driver state, rename ``.partial`` into place, repoint ``latest``, prune old ones."""
    final = partial.with_name(partial.name.removesuffix(".partial"))
    try:
        _write_atomic(partial / STATE_FILE, json.dumps(asdict(state), indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(final.parent / LATEST, final.name)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint for step {state.step} not written ({e.strerror or e}); the previous one is intact"
        ) from e
    _prune(final.parent, keep)
    return final


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None. Leftover ``.partial`` dirs are ignored."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete; remove it or the pointer")
    return path


def load_state(ckpt: Path) -> DriverState:
    return DriverState(**json.loads((ckpt / STATE_FILE).read_text()))


def clean_partials(run_dir: str | Path) -> int:
    root = checkpoint_root(run_dir)
    removed = 0
    for p in root.glob("*.partial") if root.exists() else []:
        shutil.rmtree(p, ignore_errors=True)
        removed += 1
    return removed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class Checkpointer:
    """Writes the run's checkpoints: every learner rank's DeepSpeed state plus the driver's state, into one
    atomic directory (``begin`` / ``commit``)."""

    def __init__(self, run_dir: str | Path, learners: Any, *, keep: int) -> None:
        self.run_dir, self.learners, self.keep = Path(run_dir), learners, keep

    def save(self, state: DriverState) -> Path:
        partial = begin(self.run_dir, state.step)
        self.learners.call(lambda lr: lr.save_checkpoint.remote(str(partial / "learner"), "ckpt"))
        return commit(partial, state, keep=self.keep)
