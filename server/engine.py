"""The engine of one shard: its tables by name.

Creation is idempotent: creating a table again with an identical config is a
no-op that returns False; a different config under the same name raises
AlreadyExists (drop the table first to change it).
"""

from __future__ import annotations

import threading

from embps.protos.config import TableConfig
from embps.server.errors import AlreadyExists, TableNotFound
from embps.server.tables import EvictResult, Table, make_table


class Engine:
    """All tables of one shard; safe to call from many threads."""

    def __init__(self) -> None:
        self._tables: dict[str, Table] = {}
        self._lock = threading.Lock()

    def create_table(self, config: TableConfig) -> bool:
        """Create ``config.name``; True if created, False if an identical table existed."""
        with self._lock:
            have = self._tables.get(config.name)
            if have is not None:
                if have.config == config:
                    return False
                raise AlreadyExists(
                    f"table {config.name!r} exists with a different config "
                    f"({_diff(have.config, config)}); drop it first or use another name"
                )
            self._tables[config.name] = make_table(config)
            return True

    def install(self, tables: list[Table]) -> None:
        """Add existing tables (restored from a checkpoint) under their names.

        Raises AlreadyExists, adding none of them, if a name is taken.
        """
        with self._lock:
            taken = sorted(t.name for t in tables if t.name in self._tables)
            if taken:
                raise AlreadyExists(
                    f"tables {taken} exist on this shard already; install restored tables "
                    "into an empty engine"
                )
            for t in tables:
                self._tables[t.name] = t

    def drop_table(self, name: str) -> bool:
        """Delete a table and its rows; False if there was none."""
        with self._lock:
            return self._tables.pop(name, None) is not None

    def table(self, name: str) -> Table:
        """The table called ``name``; TableNotFound if absent."""
        t = self._tables.get(name)
        if t is None:
            known = ", ".join(sorted(self._tables)) or "none"
            raise TableNotFound(
                f"no table {name!r} on this shard (tables: {known}); create it first"
            )
        return t

    def tables(self) -> list[Table]:
        """Every table, in name order."""
        with self._lock:
            return [self._tables[n] for n in sorted(self._tables)]

    def evict(self, name: str = "") -> list[EvictResult]:
        """Run steps-to-live / L2 eviction on table ``name`` (TableNotFound if absent) or,
        with ``""``, on every table in name order; one result per table swept."""
        tables = [self.table(name)] if name else self.tables()
        return [t.evict() for t in tables]


def _diff(a: TableConfig, b: TableConfig) -> str:
    from dataclasses import fields

    parts = [f"{f.name}: {getattr(a, f.name)!r} != {getattr(b, f.name)!r}"
             for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]  # fmt: skip
    return "; ".join(parts)
