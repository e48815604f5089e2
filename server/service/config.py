"""``ShardConfig``: everything one shard process needs, validated in ``__post_init__``. The one home of every server option: ``embps serve``'s flags and config-file keys are derived from its fields (``embps.server.serve``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embps.protos.config import TableConfig
from embps.protos.limits import (
    DEFAULT_MAX_KEYS_PER_REQUEST,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_GRPC_MESSAGE_BYTES,
)
from embps.server.tables import ROW_DTYPES


@dataclass(frozen=True)
class Option:
    """How a ``ShardConfig`` field is set from outside: ``embps serve --FLAG`` and the
    config file's ``server`` key (both named ``flag``, dashes on the command line).

    help         the ``--help`` text; ``{default}`` is the command line's default
    metavar      argparse's metavar (None: argparse's own)
    flag         the option's name where it differs from the field's
    cli_default  ``embps serve``'s default where it differs from the field's (None: the
                 same; a process listens on 50051, an in-process ShardConfig on any port)
    """

    help: str
    metavar: str | None = None
    flag: str | None = None
    cli_default: Any = None


def option(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    flag: str | None = None,
    cli_default: Any = None,
) -> Any:
    """A ``ShardConfig`` field that ``embps serve`` exposes (see ``Option``)."""
    return field(default=default, metadata={"option": Option(help, metavar, flag, cli_default)})


@dataclass(frozen=True)
class ShardConfig:
    """Everything one shard process needs. Validated in ``__post_init__``.

    Example::

        ShardConfig(shard_id=1, num_shards=3, host="0.0.0.0", port=50052,
                    tables=(TableConfig("item", dim=16),))
    """

    shard_id: int = 0  # this shard's id, in [0, num_shards)
    num_shards: int = option(
        1, "number of shards (default {default})", flag="shards"
    )  # shard count every data request must carry
    host: str = option(
        "127.0.0.1", "interface to listen on (default {default}; 0.0.0.0 in a container)"
    )
    port: int = option(
        0,
        "gRPC port of shard 0; shard i listens on port+i (default {default}; 0: any free port)",
        cli_default=50051,
    )  # this shard's gRPC port (0: any free port; see ShardServer.port)
    metrics_port: int | None = option(
        None,
        "Prometheus port of shard 0; shard i serves on metrics-port+i (default {default}; "
        "0: any free port)",
        cli_default=9091,
    )  # Prometheus /metrics port (None: no HTTP server; 0: any)
    max_keys_per_request: int = option(
        DEFAULT_MAX_KEYS_PER_REQUEST, "larger requests get RESOURCE_EXHAUSTED (default {default})"
    )
    max_message_bytes: int = option(
        DEFAULT_MAX_MESSAGE_BYTES, "gRPC message size limit (default {default})"
    )  # gRPC send and receive limit
    max_workers: int = option(8, "RPC threads per shard (default {default})")
    grace_seconds: float = option(
        10.0, "on SIGTERM, how long in-flight calls may finish (default {default})"
    )
    drain_delay_seconds: float = option(
        0.0, "on SIGTERM, report NOT_SERVING this long before refusing calls (default 0)"
    )
    verify_routing: bool = option(
        True, "check that every key of a request belongs to the shard (default on)"
    )
    tables: tuple[TableConfig, ...] = field(default_factory=tuple)  # created at start
    checkpoint_dir: str | None = option(
        None,
        "write checkpoints to DIR/<step>/shard-<i>-of-<n>/ (Checkpoint RPC, "
        "--checkpoint-every, on exit)",
        metavar="DIR",
    )
    checkpoint_every: float = option(
        0.0,
        "checkpoint every SECONDS, at multiples of it on the wall clock (default 0: never)",
        metavar="SECONDS",
    )
    checkpoint_incremental: int = option(
        0,
        "every K-th checkpoint is full, the others incremental (default 0: always full)",
        metavar="K",
    )  # K >= 2: every K-th checkpoint full, others incremental
    checkpoint_on_exit: bool | None = option(
        None, "on SIGTERM, checkpoint after draining (default: on when --checkpoint-dir is set)"
    )
    restore: str | None = option(
        None,
        "at start, load the newest complete checkpoint under --checkpoint-dir (none: start "
        "empty) or the checkpoint DIR/<step> (any shard count)",
        metavar="latest|PATH",
    )
    # Sweeps also run before every checkpoint and on the Evict RPC (server/eviction.py).
    evict_every: float = option(
        60.0,
        "sweep every table's steps_to_live / l2_evict_threshold eviction every SECONDS "
        "(default {default:g}; 0: only at checkpoints and on the Evict call)",
        metavar="SECONDS",
    )
    # A read-only replica (server/replica.py; None: a training shard) follows the change
    # feed of the training shard at replica_of every replica_poll_seconds, and reports
    # NOT_SERVING while its lag exceeds max_lag seconds (0: never). ``embps serve`` takes
    # one address per shard (or a {i} pattern) and gives shard i its own.
    replica_of: str | None = option(
        None,
        "run read-only replica shards: shard i follows the training shard at the i-th of "
        "these comma-separated host:port (in shard-id order; or a pattern with {{i}}, e.g. "
        "embps-{{i}}.embps-headless:50051) and serves its inference pulls (README 'Serving "
        "replicas')",
        metavar="ADDRESSES",
    )
    replica_poll_seconds: float = option(
        0.2, "how often a replica reads the change feed (default {default})", metavar="S"
    )
    max_lag: float = option(
        0.0,
        "a replica reports NOT_SERVING while the state it serves is older than S seconds "
        "(default 0: never)",
        metavar="S",
    )
    replica_dtype: str = option(
        "float32",
        "row values of a replica's tables: float32 (the training rows' bits), "
        "float16, or int8 (a scale and offset per row; about a third of float32's bytes per "
        "key at dim 16) (default {default})",
        metavar="DTYPE",
    )
    replica_checkpoint_dir: str | None = option(
        None,
        "a replica starts from the newest complete checkpoint of its training shard "
        "under DIR (the training shards' --checkpoint-dir), serves it at once, then follows "
        "the feed from its version",
        metavar="DIR",
    )
    replica_token_file: str | None = option(
        None,
        "a replica presents the bearer token in FILE to its training shard (a read token suffices)",
        metavar="FILE",
    )
    replica_tls_ca: str | None = option(
        None, "a replica follows over TLS, trusting this CA", metavar="PEM"
    )
    replica_tls_cert: str | None = option(
        None,
        "a replica's client certificate for mutual TLS (with --replica-tls-key)",
        metavar="PEM",
    )
    replica_tls_key: str | None = option(None, "private key of --replica-tls-cert", metavar="PEM")
    tls_cert: str | None = option(
        None,
        "serve TLS only, with this certificate (needs --tls-key; README 'Security')",
        metavar="PEM",
    )
    tls_key: str | None = option(None, "private key of --tls-cert", metavar="PEM")
    tls_client_ca: str | None = option(
        None, "mutual TLS: refuse clients without a certificate signed by this CA", metavar="PEM"
    )
    auth_token_file: str | None = option(
        None,
        "bearer tokens, one 'read|write|admin TOKEN' per line; every call but health "
        "needs one (SIGHUP reloads the file)",
        metavar="FILE",
    )  # server/service/auth.py

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
        if self.replica_dtype not in ROW_DTYPES:
            raise ValueError(
                f"replica_dtype {self.replica_dtype!r}: use one of {', '.join(ROW_DTYPES)}"
            )
        if self.replica_checkpoint_dir and self.replica_of is None:
            raise ValueError("replica_checkpoint_dir (--replica-checkpoint-dir) needs replica_of")
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
