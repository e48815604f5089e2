"""``ShardConfig``: everything one shard process needs, validated in ``__post_init__``. The one home of every server option: ``embps serve``'s flags and config-file keys are derived from its fields (``embps.server.serve``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from embps.protos.config import TableConfig
from embps.protos.limits import (
    DEFAULT_MAX_KEYS_PER_REQUEST,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_GRPC_MESSAGE_BYTES,
)

# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardConfig:
    """Everything one shard process needs. Validated in ``__post_init__``.

    Example::

        ShardConfig(shard_id=1, num_shards=3, host="0.0.0.0", port=50052,
                    tables=(TableConfig("item", dim=16),))
    """

    shard_id: int = 0  # this shard's id, in [0, num_shards)
    num_shards: int = 1  # shard count every data request must carry
    host: str = "127.0.0.1"  # interface to listen on ("0.0.0.0": all)
    port: int = 0  # gRPC port (0: any free port; see ShardServer.port)
    metrics_port: int | None = None  # Prometheus /metrics port (None: no HTTP server; 0: any)
    max_keys_per_request: int = DEFAULT_MAX_KEYS_PER_REQUEST  # more keys: RESOURCE_EXHAUSTED
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send and receive limit
    max_workers: int = 8  # threads handling RPCs
    grace_seconds: float = 10.0  # on stop: how long in-flight calls may run
    drain_delay_seconds: float = 0.0  # on stop: report NOT_SERVING this long before closing
    verify_routing: bool = True  # check that every key of a request belongs to this shard
    tables: tuple[TableConfig, ...] = field(default_factory=tuple)  # created at start
    checkpoint_dir: str | None = None  # checkpoints go to <dir>/<step>/shard-<i>-of-<n>/
    checkpoint_every: float = 0.0  # seconds between periodic checkpoints (0: none)
    checkpoint_incremental: int = 0  # K >= 2: every K-th checkpoint full, others incremental
    checkpoint_on_exit: bool | None = None  # after draining on stop (None: on with a dir)
    restore: str | None = None  # at start: "latest" (in checkpoint_dir) or a <dir>/<step> path
    # seconds between eviction sweeps (steps_to_live, l2_evict_threshold; 0: none). Sweeps
    # also run before every checkpoint and on the Evict RPC (server/eviction.py).
    evict_every: float = 60.0
    # a read-only replica of this training shard's address (server/replica.py; None: a
    # training shard): it follows the change feed every replica_poll_seconds and reports
    # NOT_SERVING while its lag exceeds max_lag seconds (0: never)
    replica_of: str | None = None
    replica_poll_seconds: float = 0.2
    max_lag: float = 0.0
    replica_token_file: str | None = None  # the bearer token a replica presents (read)
    replica_tls_ca: str | None = None  # a replica follows over TLS, trusting this CA
    replica_tls_cert: str | None = None  # and presents this client certificate (mTLS)
    replica_tls_key: str | None = None
    tls_cert: str | None = None  # PEM server certificate: serve TLS only (with tls_key)
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA: mutual TLS, clients need a cert it signed
    auth_token_file: str | None = None  # bearer tokens with permissions (server/service/auth.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {self.num_shards!r}")
        if not isinstance(self.shard_id, int) or not 0 <= self.shard_id < self.num_shards:
            raise ValueError(
                f"shard_id must be in [0, {self.num_shards}) for {self.num_shards} shards, "
                f"got {self.shard_id!r}"
            )
        for name in ("port", "metrics_port"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= 65535):
                raise ValueError(f"{name} must be an integer in [0, 65535], got {v!r}")
        if self.max_keys_per_request < 1:
            raise ValueError(
                f"max_keys_per_request must be >= 1, got {self.max_keys_per_request!r}"
            )
        if not 1 << 16 <= self.max_message_bytes <= MAX_GRPC_MESSAGE_BYTES:
            raise ValueError(
                f"max_message_bytes must be in [65536, {MAX_GRPC_MESSAGE_BYTES}], "
                f"got {self.max_message_bytes!r}"
            )
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers!r}")
        if self.grace_seconds < 0 or self.drain_delay_seconds < 0:
            raise ValueError("grace_seconds and drain_delay_seconds must be >= 0")
        names = [t.name for t in self.tables]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate table names in the config: {dups}")
        if not self.checkpoint_every >= 0:
            raise ValueError(
                f"checkpoint_every must be >= 0 seconds, got {self.checkpoint_every!r}"
            )
        if not (isinstance(self.evict_every, int | float) and self.evict_every >= 0):
            raise ValueError(f"evict_every must be >= 0 seconds, got {self.evict_every!r}")
        if not (self.replica_poll_seconds > 0 and self.max_lag >= 0):
            raise ValueError(
                f"replica_poll_seconds must be > 0 and max_lag >= 0, got "
                f"{self.replica_poll_seconds!r} and {self.max_lag!r}"
            )
        if self.replica_of is not None:
            clash = [n for n, on in (("tables", bool(self.tables)),
                                     ("checkpoint_dir", bool(self.checkpoint_dir)),
                                     ("restore", bool(self.restore))) if on]  # fmt: skip
            if not self.replica_of or clash:
                raise ValueError(
                    f"replica_of must be the training shard's host:port, and a replica takes "
                    f"no {', '.join(clash) or 'other state'}: it follows the training shard's "
                    "tables (checkpoint the training shards)"
                )
        if not isinstance(self.checkpoint_incremental, int) or self.checkpoint_incremental < 0:
            raise ValueError(
                f"checkpoint_incremental must be an integer >= 0, got {self.checkpoint_incremental!r}"
            )
        if not self.checkpoint_dir:
            needs = [
                flag
                for flag, on in (
                    ("--checkpoint-every", self.checkpoint_every > 0),
                    ("--checkpoint-incremental", self.checkpoint_incremental > 0),
                    ("--checkpoint-on-exit", self.checkpoint_on_exit is True),
                    ("--restore latest", self.restore == "latest"),
                )
                if on
            ]
            if needs:
                raise ValueError(
                    f"{', '.join(needs)} needs a checkpoint directory (--checkpoint-dir)"
                )
        if self.restore is not None and not self.restore:
            raise ValueError("restore must be 'latest' or a checkpoint path <dir>/<step>")
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("cert", "key") if self.tls_cert else ("key", "cert")
            raise ValueError(
                f"--tls-{given} needs --tls-{missing}: TLS needs the certificate and its key"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(
                "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: clients can only "
                "present certificates over TLS"
            )

    @property
    def exit_checkpoint(self) -> bool:
        """Whether stopping writes a checkpoint (default: yes when there is a directory)."""
        return bool(self.checkpoint_dir) and self.checkpoint_on_exit is not False
