"""Live progress: one line per step with the numbers a researcher watches (reward, entropy, accuracy,
the law's fit at the current entropy) and an ETA; warnings (collapse, surge) printed as they happen.

The law's ceiling ``b - a`` (its extrapolation to H = 0) is not printed here: it can exceed 1 and read
as an accuracy it is not. The fitted ``R(H)`` at the step's own entropy is on the accuracy scale."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from pipeline.core.law import law_at


class Progress:
    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None) -> None:
        self.total, self.start, self.stream = total, start, stream or sys.stdout
        self.t0 = time.perf_counter()

    def update(self, row: dict[str, Any]) -> None:
        step = row["step"]
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = [
            f"step {step:>4}/{self.total}",
            f"reward {row.get('reward/mean', float('nan')):.3f}",
            f"entropy {row.get('entropy/mean', float('nan')):.4f}",
        ]
        if "eval/pass@1" in row:
            parts.append(f"eval pass@1 {row['eval/pass@1']:.3f}")
        fit = law_at(row, row.get("entropy/mean"))
        if fit is not None:
            parts.append(f"law R(H) {fit:.3f}")
        if "cov/mean" in row:
            parts.append(f"cov {row['cov/mean']:.3g}")
        parts.append(f"{row.get('time/step', 0.0):.1f}s/step  eta {eta / 60:.1f} min")
        print(" | ".join(parts), file=self.stream, flush=True)
        for w in row.get("warnings", []):
            print(f"  WARNING: {w}", file=self.stream, flush=True)

    def close(self) -> None:
        print(f"done in {(time.perf_counter() - self.t0) / 60:.1f} min", file=self.stream, flush=True)
