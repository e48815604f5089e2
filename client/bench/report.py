"""What every benchmark prints and writes: targets, the results table, the JSON file.

Each benchmark runs its baseline beside itself and reports the ratio; these
helpers keep every benchmark's output alike (the modules of ``embps.client.bench``).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Target:
    """A project target: ``ratio`` (a JSON key) compared with ``bound``."""

    ratio: str
    bound: float
    at_most: bool = False  # True: lower is better (memory)

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        return value <= self.bound if self.at_most else value >= self.bound

    def text(self) -> str:
        """The target as printed, e.g. '>= 2.5x'."""
        return f"{'<=' if self.at_most else '>='} {self.bound:g}x"


def target_cells(target: Target | None, value: float) -> tuple[str, str]:
    """A report row's last two cells: the target as printed and whether ``value`` meets
    it ('yes' / 'NO'); two empty cells for a row without a target."""
    if target is None:
        return "", ""
    return target.text(), "yes" if target.met(value) else "NO"


def fmt_num(v: float) -> str:
    """A throughput with 3-4 significant digits."""
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_ratio(v: float) -> str:
    """A ratio with three significant digits: 0.541x, 2.90x, 35.1x."""
    return f"{v:#.3g}".rstrip(".") + "x"


def table(head: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Aligned text lines: the header, a rule, the rows; columns in ``right`` align right."""
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]

    def fmt(row: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [fmt(head), "  ".join("-" * w for w in widths), *(fmt(row) for row in rows)]


def machine_line(extra: str = "") -> str:
    """'machine: x86_64, 2 cores; Python 3.11.7, numpy 2.4.6' plus ``extra``."""
    line = (
        f"machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )
    return line + extra


def write_json(path: str, results: dict[str, Any]) -> None:
    """Write the flat results object to ``path`` (creating its folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")


def best_interleaved(reps: int, work: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Shortest wall time (seconds) of each callable over ``reps`` rounds.

    Each round runs every contender once, in turn, so all of them see the same
    state of a shared machine; garbage collection is paused while one runs.
    """
    best = dict.fromkeys(work, float("inf"))
    for _ in range(reps):
        for name, fn in work.items():
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
            finally:
                gc.enable()
    return best
