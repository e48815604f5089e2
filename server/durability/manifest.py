"""What a checkpoint directory holds and how to find one: the format, shard directory names, the manifest, and discovery (list_steps, latest_step, shard_count_at, is_private, resolve)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embps.protos.config import TableConfig

FORMAT = "embps-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file."""


@dataclass(frozen=True)
class ShardCheckpoint:
    """Where one shard's checkpoint of one step lives."""

    root: Path
    step: int
    shard: int
    num_shards: int

    @property
    def path(self) -> Path:
        """The shard's directory."""
        return self.root / str(self.step) / shard_dir_name(self.shard, self.num_shards)


def shard_dir_name(shard: int, num_shards: int) -> str:
    """``shard-<i>-of-<n>``."""
    return f"shard-{shard}-of-{num_shards}"


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


def list_steps(root: Path | str) -> list[int]:
    """Steps under ``root`` with at least one complete shard directory, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if (
            d.is_dir()
            and d.name.isdigit()
            and any((s / MANIFEST).is_file() for s in d.iterdir() if not s.name.startswith("."))
        ):
            steps.append(int(d.name))
    return sorted(steps)


def shard_count_at(root: Path | str, step: int) -> int:
    """The shard count N of the complete checkpoint at ``step``; CheckpointError if incomplete."""
    d = Path(root) / str(step)
    counts = set()
    for s in d.iterdir() if d.is_dir() else []:
        parts = s.name.split("-")
        if (
            len(parts) == 4
            and parts[0] == "shard"
            and parts[2] == "of"
            and (s / MANIFEST).is_file()
        ):
            counts.add(int(parts[3]))
    if len(counts) != 1:
        raise CheckpointError(
            f"checkpoint {d} has no complete shard set (found shard counts {sorted(counts)})"
        )
    n = counts.pop()
    missing = [i for i in range(n) if not (d / shard_dir_name(i, n) / MANIFEST).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {d} is incomplete: shards {missing} of {n} are missing")
    return n


def is_private(root: Path | str, shard: int, num_shards: int) -> bool:
    """Whether ``root`` holds this shard's checkpoints only: no step under it has another
    shard's directory. A Kubernetes StatefulSet gives each pod a volume of its own
    (ReadWriteOnce), so there a checkpoint is never complete in one directory: each shard
    restores, and numbers its next checkpoint, from its own."""
    own = shard_dir_name(shard, num_shards)
    for step in list_steps(root):
        for s in (Path(root) / str(step)).iterdir():
            if s.name.startswith("shard-") and s.name != own:
                return False
    return True


def latest_step(
    root: Path | str, shard: int | None = None, num_shards: int | None = None
) -> int | None:
    """The newest step whose every shard directory is present, or None.

    With ``shard`` and ``num_shards``, on a private volume (``is_private``): the newest
    step with this shard's own complete directory. LIMITATIONS: shards on private volumes
    agree on steps only by checkpointing together (the wall-clock period, the same
    Checkpoint call); a shard that missed a checkpoint numbers its next one lower, and a
    restore then loads each shard's newest, which may be of different moments.
    """
    if shard is not None and num_shards is not None and is_private(root, shard, num_shards):
        own = shard_dir_name(shard, num_shards)
        for step in reversed(list_steps(root)):
            if (Path(root) / str(step) / own / MANIFEST).is_file():
                return step
        return None
    for step in reversed(list_steps(root)):
        try:
            shard_count_at(root, step)
        except CheckpointError:
            continue
        return step
    return None


def resolve(spec: str, root: Path | str | None = None) -> tuple[Path, int]:
    """``latest`` (needs ``root``) or a path ``<root>/<step>`` -> (root, step)."""
    if spec == "latest":
        if root is None:
            raise CheckpointError(
                "--restore latest needs a checkpoint directory (--checkpoint-dir)"
            )
        step = latest_step(root)
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {root}")
        return Path(root), step
    p = Path(spec)
    if p.name.startswith("shard-"):
        p = p.parent
    if not p.name.isdigit():
        raise CheckpointError(f"{spec} is not a checkpoint step directory (<dir>/<step>)")
    return p.parent, int(p.name)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The parsed, checked manifest of a shard directory."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint manifest {mpath}: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath} is not an embps checkpoint of format version {FORMAT_VERSION} "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    return manifest


Progress = Callable[[int], None]  # called with the bytes of each array file read


def _entry_config(path: Path, entry: dict) -> TableConfig:
    """The table config of a manifest entry; CheckpointError naming the manifest if it is bad."""
    try:
        return TableConfig.from_dict(entry["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path / MANIFEST}: bad config for table {entry['config'].get('name')!r}: {e}"
        ) from e


OnRead = Callable[[str, np.ndarray], None]  # (array name, array read and verified)
