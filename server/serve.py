"""``embps serve``: run N local shard processes, or one shard in this process.

Two modes:

* ``embps serve --shards N`` (no ``--shard-id``): a supervisor. It starts N
  child processes (``python -m embps.server.serve --shard-id i ...``), shard i
  on port P+i with metrics on M+i (with P or M = 0 every shard takes any free
  port). SIGTERM / SIGINT are forwarded to the children, which drain and exit
  0; the supervisor then exits 0. If a shard dies (or exits on its own), the
  supervisor logs which one and how (exit code or signal), stops the others
  and exits 1: a half-running cluster is never hidden.
* ``embps serve --shards N --shard-id i``: one shard in this process, on
  exactly ``--port`` and ``--metrics-port`` (Kubernetes: one pod per shard, the
  StatefulSet ordinal is the shard id).

Each shard prints one line to stdout when it accepts calls::

    shard 0/2 listening on 127.0.0.1:50051, metrics on :9091 (pid 1234)

Shutdown of a shard: health NOT_SERVING, wait --drain-delay-seconds, refuse new
calls, let in-flight calls finish (up to --grace-seconds), write the exit
checkpoint (with --checkpoint-dir, unless --no-checkpoint-on-exit), exit 0.

Durability (docs/durability.md): ``--checkpoint-dir DIR`` enables the
Checkpoint RPC, ``--checkpoint-every S`` periodic checkpoints,
``--checkpoint-incremental K`` incremental ones; ``--restore latest|PATH``
loads a checkpoint at start (onto any shard count) while the gRPC server
already answers UNAVAILABLE. Exit codes of a shard: 0 stopped cleanly, 2 bad
config or port, 3 the restore failed (the log says which file and why), 4 the
exit checkpoint failed.

Security (README "Security", server/service/auth.py): ``--tls-cert/--tls-key`` serve
TLS only, ``--tls-client-ca`` adds mutual TLS, ``--auth-token-file`` requires
bearer tokens with read/write/admin permissions (SIGHUP re-reads the file). A
missing or malformed certificate, key or token file is exit code 2 at start.

Options come from the command line, then the ``--config`` file's ``server``
section, then the defaults below; tables come from the file's ``tables``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from embps.protos.config import TableConfig
from embps.server.replica import follower_credentials, read_token
from embps.server.service import ShardConfig, build_server
from embps.server.service.auth import load_token_file, server_credentials
from embps.server.service.config import Option

log = logging.getLogger("embps.serve")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# The options of one shard are ``ShardConfig``'s fields marked with ``option(...)``
# (server/service/config.py): their flags, config-file keys, types, defaults and help
# are derived here, so a new option is one field there. ``log_level`` is the process's.
OPTIONS: dict[str, tuple[Field[Any], Option]] = {
    (f.metadata["option"].flag or f.name): (f, f.metadata["option"])
    for f in fields(ShardConfig)
    if "option" in f.metadata
}
_FILE_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int, "float": (int, float), "bool": bool, "str": str
}  # fmt: skip


_ARG_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def _base_type(f: Field[Any]) -> str:
    """``"int | None"`` -> ``"int"``: the type an option's value has when it is set."""
    names = [t.strip() for t in str(f.type).split("|") if t.strip() != "None"]
    if len(names) != 1 or names[0] not in _FILE_TYPES:
        raise TypeError(f"ShardConfig.{f.name}: an option must be one of {sorted(_FILE_TYPES)}")
    return names[0]


DEFAULTS: dict[str, Any] = {
    key: (o.cli_default if o.cli_default is not None else f.default)
    for key, (f, o) in OPTIONS.items()
} | {"log_level": "INFO"}
# option name -> type accepted in the config file's ``server`` section
SERVER_OPTIONS: dict[str, type | tuple[type, ...]] = {
    key: _FILE_TYPES[_base_type(f)] for key, (f, _) in OPTIONS.items()
} | {"log_level": str}
EXIT_OK, EXIT_SHARD_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
EXIT_RESTORE_FAILED, EXIT_CHECKPOINT_FAILED = 3, 4
_EXIT_MEANING = {
    EXIT_BAD_CONFIG: "bad config or port",
    EXIT_RESTORE_FAILED: "restore failed",
    EXIT_CHECKPOINT_FAILED: "exit checkpoint failed",
}
_KILL_MARGIN_S = 10.0  # after grace + drain delay, stragglers are killed


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``embps serve`` flags. Every option defaults to None: unset flags defer to the file."""
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file: server options and "
                        "tables to create at start (see docs/service.md)")  # fmt: skip
    parser.add_argument("--shard-id", type=int, help="run only this shard, in this process, on "
                        "exactly --port and --metrics-port (Kubernetes: the pod ordinal)")  # fmt: skip
    for key, (f, o) in OPTIONS.items():
        flag = "--" + key.replace("_", "-")
        text = o.help.format(default=DEFAULTS[key])
        kind = _base_type(f)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text)  # fmt: skip
        else:
            parser.add_argument(flag, type=_ARG_TYPES[kind],
                                metavar=o.metavar, help=text)  # fmt: skip
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        help=f"{', '.join(LOG_LEVELS)} (default {DEFAULTS['log_level']}; logs go "
                        "to stderr)")  # fmt: skip


def resolve_options(args: argparse.Namespace) -> tuple[dict[str, Any], tuple[TableConfig, ...]]:
    """(server options, table configs): command line > config file > defaults.

    Raises ValueError for a bad file or option.
    """
    opts = dict(DEFAULTS)
    tables: tuple[TableConfig, ...] = ()
    if args.config:
        f = load_serve_file(args.config)
        opts.update(f.server)
        tables = f.tables
    for key in SERVER_OPTIONS:
        v = getattr(args, key, None)
        if v is not None:
            opts[key] = v
    opts["shard_id"] = getattr(args, "shard_id", None)  # one shard of a replica group
    opts["log_level"] = str(opts["log_level"]).upper()
    if opts["log_level"] not in LOG_LEVELS:
        raise ValueError(f"log_level {opts['log_level']!r} is not one of {', '.join(LOG_LEVELS)}")
    if opts["shards"] < 1:
        raise ValueError(f"--shards must be >= 1, got {opts['shards']}")
    for key in ("port", "metrics_port"):
        last = opts[key] + (opts["shards"] - 1 if opts[key] else 0)
        if opts[key] < 0 or last > 65535:
            raise ValueError(f"{key} {opts[key]} with {opts['shards']} shards leaves [0, 65535]")
    shard_config(opts, tables, 0)  # validates every option once, before any shard starts
    if opts["tls_cert"] and opts["tls_key"]:  # and the certificates and tokens (ValueError)
        server_credentials(opts["tls_cert"], opts["tls_key"], opts["tls_client_ca"])
    if opts["auth_token_file"]:
        load_token_file(opts["auth_token_file"])
    if opts["replica_of"]:  # the follower's credentials, checked before any shard starts
        follower_credentials(opts["replica_tls_ca"], opts["replica_tls_cert"],
                             opts["replica_tls_key"])  # fmt: skip
        read_token(opts["replica_token_file"])
    return opts, tables


def replica_address(opts: dict[str, Any], shard_id: int) -> str | None:
    """The training shard replica ``shard_id`` follows (None: not a replica).

    ``replica_of``: one host:port per shard, comma-separated, in shard-id order (a single
    one is fine with one shard, or with ``--shard-id`` when it is that shard's own), or a
    pattern with ``{i}`` for the shard id (``embps-{i}.embps-headless:50051``).
    """
    spec = opts.get("replica_of")
    if not spec:
        return None
    if "{i}" in str(spec):  # a pattern, e.g. a StatefulSet's DNS names
        return str(spec).replace("{i}", str(shard_id))
    addresses = [a.strip() for a in str(spec).split(",") if a.strip()]
    if len(addresses) == 1 and (opts["shards"] == 1 or opts.get("shard_id") is not None):
        return addresses[0]
    if len(addresses) != opts["shards"]:
        raise ValueError(
            f"--replica-of names {len(addresses)} training shards but --shards is "
            f"{opts['shards']}: give one host:port per shard, in shard-id order"
        )
    return addresses[shard_id]


def shard_config(
    opts: dict[str, Any], tables: tuple[TableConfig, ...], shard_id: int
) -> ShardConfig:
    """Config of one shard (ports exactly as given: the caller offsets them)."""
    kw: dict[str, Any] = {}
    for key, (f, _) in OPTIONS.items():
        v = opts[key]
        if v is not None and _base_type(f) == "float":
            v = float(v)  # a file's 10 is 10.0
        kw[f.name] = v
    kw["replica_of"] = replica_address(opts, shard_id)
    return ShardConfig(shard_id=shard_id, tables=tables, **kw)


# --------------------------------------------------------------------------
# One shard in this process
# --------------------------------------------------------------------------


def announce_ready(line: str) -> None:
    """Write ``line`` and its newline to stdout in ONE write(2).

    The shards of `embps serve --shards N` share the supervisor's stdout pipe, and
    print() under PYTHONUNBUFFERED=1 writes the text and the newline separately, so
    two shards' readiness lines could interleave into one unparseable line.
    """
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def run_shard(cfg: ShardConfig) -> int:
    """Serve until SIGTERM/SIGINT, then drain, write the exit checkpoint and return 0.

    2: the shard cannot start; 3: its restore failed; 4: its exit checkpoint failed.
    """
    stop = threading.Event()
    # `kill -USR1 <pid>` writes every thread's stack to stderr: for a shard that seems stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("shard %d: %s received, draining", cfg.shard_id, signal.Signals(signum).name)
            stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        shard = build_server(cfg)
        shard.start()
    except (OSError, ValueError) as e:
        log.error("shard %d/%d cannot start: %s", cfg.shard_id, cfg.num_shards, e)
        return EXIT_BAD_CONFIG
    if shard.authorizer is not None:  # `kill -HUP <pid>`: re-read --auth-token-file
        auth = shard.authorizer
        signal.signal(signal.SIGHUP, lambda _s, _f: auth.reload())
    ready = (
        f"shard {cfg.shard_id}/{cfg.num_shards} listening on {cfg.host}:{shard.port}, "
        f"metrics on :{shard.metrics_port} (pid {os.getpid()})"
    )
    announce_ready(ready)  # on stdout (scripts wait for it) ...
    log.info("%s", ready)  # ... and in the log
    while not stop.wait(0.5):
        if shard.restore_error is not None:
            shard.stop(grace=0, checkpoint=False)
            log.error(
                "shard %d/%d exits: cannot restore: %s",
                cfg.shard_id,
                cfg.num_shards,
                shard.restore_error,
            )
            return EXIT_RESTORE_FAILED
    t0 = time.monotonic()
    try:
        shard.stop()
    except Exception as e:
        log.error("shard %d: EXIT CHECKPOINT FAILED: %s: %s", cfg.shard_id, type(e).__name__, e)
        return EXIT_CHECKPOINT_FAILED
    log.info("shard %d: stopped in %.2fs, exiting", cfg.shard_id, time.monotonic() - t0)
    return EXIT_OK


# --------------------------------------------------------------------------
# Supervisor of N shard processes
# --------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if the supervisor dies (no orphaned shards)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_argv(args: argparse.Namespace, opts: dict[str, Any], i: int) -> list[str]:
    argv = [sys.executable, "-m", "embps.server.serve", "--shard-id", str(i)]
    for key in SERVER_OPTIONS:
        v = opts[key]
        if v is None:
            continue
        if key in ("port", "metrics_port") and v:
            v += i
        flag = "--" + key.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        else:
            argv += [flag, str(v)]
    if args.config:
        argv += ["--config", args.config]
    return argv


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    why = _EXIT_MEANING.get(rc)
    return f"exited with code {rc}" + (f" ({why}: see its log above)" if why else "")


def supervise(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    """Start the shards, forward signals, watch them. 0: clean stop; 1: a shard failed."""
    n = opts["shards"]
    procs: list[subprocess.Popen[bytes]] = []
    stopping = threading.Event()

    def forward(signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            log.info("%s received: stopping %d shards", signal.Signals(signum).name, n)
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def forward_hup(_signum: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if opts["auth_token_file"]:  # SIGHUP: every shard re-reads its token file
        signal.signal(signal.SIGHUP, forward_hup)
    for i in range(n):
        procs.append(subprocess.Popen(_child_argv(args, opts, i), preexec_fn=_die_with_parent))
        if stopping.is_set():  # a signal arrived while starting
            procs[-1].send_signal(signal.SIGTERM)
    log.info("started %d shards: pids %s", n, [p.pid for p in procs])

    failed: list[int] = []
    done: set[int] = set()
    kill_at: float | None = None
    while len(done) < n:
        for i, p in enumerate(procs):
            rc = p.poll()
            if rc is None or i in done:
                continue
            done.add(i)
            if rc == 0 and stopping.is_set():
                log.info("shard %d/%d (pid %d) stopped cleanly", i, n, p.pid)
                continue
            failed.append(i)
            why = _describe_exit(rc) + ("" if stopping.is_set() else " while serving")
            log.error("SHARD FAILED: shard %d/%d (pid %d) %s", i, n, p.pid, why)
            if not stopping.is_set():
                log.error("stopping the other shards: a cluster without shard %d is unusable", i)
                forward(signal.SIGTERM, None)
        if stopping.is_set() and kill_at is None:
            kill_at = time.monotonic() + opts["grace_seconds"] + opts["drain_delay_seconds"]
            kill_at += _KILL_MARGIN_S
        if kill_at is not None and time.monotonic() > kill_at:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    log.error("shard %d (pid %d) did not stop in time: killing it", i, p.pid)
                    p.kill()
            kill_at = float("inf")
        time.sleep(0.05)
    if failed:
        log.error("embps serve: shards %s failed; exiting with code %d", failed, EXIT_SHARD_FAILED)
        return EXIT_SHARD_FAILED
    log.info("embps serve: all %d shards stopped", n)
    return EXIT_OK


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``embps serve``: one shard (``--shard-id``) or a supervisor of ``--shards`` processes."""
    role = "supervisor" if args.shard_id is None else f"shard {args.shard_id}"
    logging.basicConfig(
        level=getattr(logging, args.log_level or DEFAULTS["log_level"]),
        format=f"%(asctime)s %(levelname)s embps[{role}] %(message)s",
        stream=sys.stderr,
    )
    try:
        opts, tables = resolve_options(args)
        logging.getLogger().setLevel(opts["log_level"])  # the config file may set it
        if args.shard_id is not None:
            cfg = shard_config(opts, tables, args.shard_id)
    except ValueError as e:
        log.error("%s", e)
        return EXIT_BAD_CONFIG
    if args.shard_id is not None:
        return run_shard(cfg)
    return supervise(args, opts)


def main(argv: list[str] | None = None) -> int:
    """``python -m embps.server.serve``: the same flags as ``embps serve``."""
    parser = argparse.ArgumentParser(prog="embps serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------
# The config file (``--config``)
# --------------------------------------------------------------------------

# The ``embps serve --config FILE`` file: server options and tables declared up front.
#
# YAML (``.yaml``/``.yml``) or TOML (``.toml``), chosen by the file's extension.
# Two top-level sections, both optional; unknown keys are an error::
#
#     server:                      # any `embps serve` option; command-line flags win
#       shards: 2
#       port: 50051
#       metrics_port: 9091
#       max_keys_per_request: 1048576
#       checkpoint_dir: /var/lib/embps/checkpoints
#       checkpoint_every: 600       # seconds
#       restore: latest
#       tls_cert: /etc/embps/tls/tls.crt     # TLS (README "Security")
#       tls_key: /etc/embps/tls/tls.key
#       auth_token_file: /etc/embps/auth/tokens
#     tables:                      # each entry: TableConfig.from_dict
#       - name: user
#         dim: 16
#         kind: adaptive
#         hash_bucket_size: 100000
#         promote_threshold: 5
#         optimizer: {name: adagrad, lr: 0.05}
#
# Every shard creates every table at start (each shard holds its part of each table).


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
    if doc is None:  # nothing but blanks and comments: a truncated file or a missing key
        raise ValueError(
            f"config file {p} is empty; it must hold a mapping with 'server' and/or 'tables' "
            "('{}' for none)"
        )
    return parse_serve_doc(doc, source=str(p))


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


if __name__ == "__main__":
    sys.exit(main())
