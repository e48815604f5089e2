"""The admission sketch of dynamic and adaptive tables: ``FrequencySketch``, a count-min sketch with conservative update over the kernels of ``embps.server.kernels.sketch`` (the DESIGN note is there)."""

from __future__ import annotations

import numpy as np

from embps.protos.config import SKETCH_DEFAULT_DEPTH, SKETCH_DEFAULT_WIDTH
from embps.server.kernels.sketch import sketch_add, sketch_cols, sketch_estimate


class FrequencySketch:
    """Count-min sketch over int64 keys. Not thread-safe: the owning table locks."""

    def __init__(
        self, width: int = SKETCH_DEFAULT_WIDTH, depth: int = SKETCH_DEFAULT_DEPTH
    ) -> None:
        if width < 1 or width & (width - 1):
            raise ValueError(f"sketch width must be a power of two, got {width}")
        if not 1 <= depth <= 16:
            raise ValueError(f"sketch depth must be in [1, 16], got {depth}")
        self.counters = np.zeros((depth, width), dtype=np.uint32)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Count a sighting of each key (int64 (n,)); return the estimates after it, int64 (n,)."""
        out = np.empty(keys.shape[0], dtype=np.int64)
        sketch_add(self.counters, keys, out)
        return out

    def add_undoable(self, keys: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """``add`` that can be taken back: returns (estimates, undo) for ``undo(undo)``."""
        cols = sketch_cols(self.counters, keys)
        old = np.take_along_axis(self.counters, cols, axis=1)
        return self.add(keys), (cols, old)

    def undo(self, undo: tuple[np.ndarray, np.ndarray]) -> None:
        """Restore the counters an ``add_undoable`` call changed."""
        cols, old = undo
        np.put_along_axis(self.counters, cols, old, axis=1)

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        """Estimated counts, int64 (n,), without counting."""
        out = np.empty(keys.shape[0], dtype=np.int64)
        sketch_estimate(self.counters, keys, out)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the counters."""
        return int(self.counters.nbytes)
