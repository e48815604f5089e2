"""The ``embps serve --config FILE`` file: server options and tables declared up front.

YAML (``.yaml``/``.yml``) or TOML (``.toml``), chosen by the file's extension.
Two top-level sections, both optional; unknown keys are an error::

    server:                      # any `embps serve` option; command-line flags win
      shards: 2
      port: 50051
      metrics_port: 9091
      max_keys_per_request: 1048576
      checkpoint_dir: /var/lib/embps/checkpoints
      checkpoint_every: 600       # seconds
      restore: latest
      tls_cert: /etc/embps/tls/tls.crt     # TLS (README "Security")
      tls_key: /etc/embps/tls/tls.key
      auth_token_file: /etc/embps/auth/tokens
    tables:                      # each entry: TableConfig.from_dict
      - name: user
        dim: 16
        kind: adaptive
        hash_bucket_size: 100000
        promote_threshold: 5
        optimizer: {name: adagrad, lr: 0.05}

Every shard creates every table at start (each shard holds its part of each table).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embps.protos.config import TableConfig

# option name -> type accepted in the file
SERVER_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "shards": int,
    "host": str,
    "port": int,
    "metrics_port": int,
    "max_keys_per_request": int,
    "max_message_bytes": int,
    "max_workers": int,
    "grace_seconds": (int, float),
    "drain_delay_seconds": (int, float),
    "verify_routing": bool,
    "checkpoint_dir": str,
    "checkpoint_every": (int, float),
    "checkpoint_incremental": int,
    "checkpoint_on_exit": bool,
    "restore": str,
    "evict_every": (int, float),
    "replica_of": str,
    "replica_poll_seconds": (int, float),
    "max_lag": (int, float),
    "replica_token_file": str,
    "replica_tls_ca": str,
    "replica_tls_cert": str,
    "replica_tls_key": str,
    "tls_cert": str,
    "tls_key": str,
    "tls_client_ca": str,
    "auth_token_file": str,
    "log_level": str,
}


@dataclass(frozen=True)
class ServeFile:
    """A parsed config file: ``server`` options (only those present) and tables."""

    server: dict[str, Any] = field(default_factory=dict)
    tables: tuple[TableConfig, ...] = ()


def load_serve_file(path: str | Path) -> ServeFile:
    """Parse and validate a YAML or TOML config file; ValueError says what is wrong and where."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read config file {p}: {e}") from None
    try:
        if suffix in (".yaml", ".yml"):
            doc = yaml.safe_load(text)
        elif suffix == ".toml":
            doc = tomllib.loads(text)
        else:
            raise ValueError(
                f"config file {p}: unknown extension {suffix!r}; use .yaml, .yml or .toml"
            )
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"config file {p} is not valid {suffix[1:].upper()}: {e}") from None
    return parse_serve_doc(doc if doc is not None else {}, source=str(p))


def parse_serve_doc(doc: Any, source: str = "config") -> ServeFile:
    """Validate an already-parsed document (a mapping with ``server`` and ``tables``)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: the top level must be a mapping with 'server' and 'tables'")
    unknown = set(doc) - {"server", "tables"}
    if unknown:
        raise ValueError(f"{source}: unknown sections {sorted(unknown)}; use 'server' and 'tables'")
    server = doc.get("server") or {}
    if not isinstance(server, dict):
        raise ValueError(f"{source}: 'server' must be a mapping of options")
    for key, value in server.items():
        if key not in SERVER_OPTIONS:
            raise ValueError(
                f"{source}: unknown server option {key!r}; known: {sorted(SERVER_OPTIONS)}"
            )
        want = SERVER_OPTIONS[key]
        bad_bool = isinstance(value, bool) and want is not bool
        if bad_bool or not isinstance(value, want):
            raise ValueError(f"{source}: server option {key!r} has the wrong type: {value!r}")
    raw_tables = doc.get("tables") or []
    if not isinstance(raw_tables, list):
        raise ValueError(f"{source}: 'tables' must be a list of table mappings")
    tables: list[TableConfig] = []
    for i, t in enumerate(raw_tables):
        if not isinstance(t, dict):
            raise ValueError(f"{source}: tables[{i}] must be a mapping, got {t!r}")
        try:
            tables.append(TableConfig.from_dict(t))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: tables[{i}]: {e}") from None
    names = [t.name for t in tables]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"{source}: duplicate table names {dups}")
    return ServeFile(server=dict(server), tables=tuple(tables))
