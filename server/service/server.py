"""The shard server: ``ShardServer`` wires a gRPC server, the servicer, the engine, the
checkpointer, the evictor, the follower (replicas), health, reflection and metrics;
``build_server(config)`` builds one ready to start (the package docstring has the
request path)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embps.protos.limits import (
    SERVICE_NAME,
)
from embps.server.durability import (
    Checkpointer,
    CheckpointError,
    CheckpointResult,
    latest_step,
    resolve,
    restore_tables,
)
from embps.server.engine import Engine
from embps.server.errors import (
    AlreadyExists,
)
from embps.server.eviction import Evictor
from embps.server.metrics import ShardMetrics
from embps.server.replica import Follower, ReplicaEngine, follower_credentials, read_token
from embps.server.service.auth import (
    AuthInterceptor,
    Authorizer,
    load_token_file,
    server_credentials,
)
from embps.server.service.config import ShardConfig
from embps.server.service.interceptors import ErrorInterceptor, ServingGate
from embps.server.service.servicer import ParameterServerServicer, add_servicer_to_server

log = logging.getLogger("embps.server")


# --------------------------------------------------------------------------
# The shard server (factory)
# --------------------------------------------------------------------------


class _LocalCheck:
    """The one part of a ``grpc.ServicerContext`` that ``HealthServicer.Check`` uses
    (``set_code`` for an unknown service), for asking the servicer in-process."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code


class ShardServer:
    """One shard: gRPC server + engine + health + metrics (+ checkpoints). Build with
    ``build_server``.

    Lifecycle: ``start()`` binds nothing new (the port is bound by
    ``build_server``) and serves; with ``config.restore`` the gRPC server is up
    at once but answers UNAVAILABLE ("shard i is restoring from <path> (x%)")
    and health NOT_SERVING until a background restore finishes (``restored``
    is set; ``restore_error`` holds the reason if it failed). ``stop()``
    drains, stops periodic checkpoints and writes the exit checkpoint.
    """

    def __init__(
        self,
        config: ShardConfig,
        engine: Engine,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        metrics: ShardMetrics,
        gate: ServingGate | None = None,
        checkpointer: Checkpointer | None = None,
        evictor: Evictor | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.server = server
        self.port = port
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.gate = gate if gate is not None else ServingGate()
        self.checkpointer = checkpointer
        self.evictor = evictor if evictor is not None else Evictor(config.shard_id, engine.tables)
        self.follower: Follower | None = None  # a replica shard's (build_server sets it)
        self.restored = threading.Event()  # set once serving (restore finished or not needed)
        self.restore_error: str | None = None  # why the restore failed (the shard must exit)
        self.restore_summary: dict | None = None
        self.authorizer: Authorizer | None = None  # bearer tokens (reload() on SIGHUP)
        self.on_restore_progress: Callable[[float], None] | None = None  # observer (tests)
        self._restore_from = ""
        self._restore_ratio = 0.0

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (``127.0.0.1`` when listening on all interfaces)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def serving(self) -> bool:
        """True once the shard serves calls (after its restore, if any)."""
        return self.restored.is_set() and self.restore_error is None

    def start(self) -> None:
        """Serve: metrics HTTP server (if configured), gRPC, then health SERVING, or, with
        ``config.restore``, NOT_SERVING while the restore runs in the background."""
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(
                self.config.metrics_port, addr=self.config.host, readiness=self.health_status
            )
        if self.follower is not None:  # a replica: serving once every table is synced
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.server.start()
            self.follower.on_ready = self._serve
            self.follower.start()
        elif self.config.restore:
            self.gate.close(self._restoring_message)
            self.metrics.restore_progress.set(0.0)
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.server.start()
            threading.Thread(
                target=self._restore_main, name=f"embps-restore-{self.config.shard_id}", daemon=True
            ).start()
        else:
            self.server.start()
            self._serve()

    def stop(
        self, grace: float | None = None, checkpoint: bool | None = None
    ) -> CheckpointResult | None:
        """Drain: health NOT_SERVING, wait ``drain_delay_seconds``, refuse new calls,
        let in-flight calls finish for up to ``grace`` seconds (default: the config's);
        then stop periodic checkpoints and write the exit checkpoint; last, close the
        metrics port (/metrics, /readyz).

        checkpoint: write the exit checkpoint (None: ``config.exit_checkpoint``). It is
        skipped when the shard never served (restore unfinished or failed). Returns what
        it wrote; raises (OSError, CheckpointError) if it failed.
        """
        try:
            return self._stop(grace, checkpoint)
        finally:
            self.metrics.close()  # after the exit checkpoint: its metrics were still served

    def _stop(self, grace: float | None, checkpoint: bool | None) -> CheckpointResult | None:
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        if self.config.drain_delay_seconds:
            time.sleep(self.config.drain_delay_seconds)
        self.server.stop(grace).wait()
        self.evictor.stop_periodic()
        if self.follower is not None:
            self.follower.stop()
        ck = self.checkpointer
        if ck is None:
            return None
        ck.stop_periodic()
        if not (self.config.exit_checkpoint if checkpoint is None else checkpoint):
            return None
        if not self.serving:
            log.warning(
                "shard %d: no exit checkpoint: the shard never served (restore %s)",
                self.config.shard_id,
                "failed" if self.restore_error else "unfinished",
            )
            return None
        return ck.checkpoint(ck.next_auto_step())

    def health_status(self) -> str:
        """The shard's overall health ("SERVING", "NOT_SERVING", ...): the answer a
        ``grpc.health.v1`` Check of service "" gets, read from the same servicer (its
        lock only, no table lock). The metrics port's ``/readyz`` serves it, so the HTTP
        probe and the gRPC health check cannot disagree."""
        call = _LocalCheck()
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), call)
        if call.code is not None:  # the servicer's NOT_FOUND for a service it never had
            return "SERVICE_UNKNOWN"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # ---------------------------------------------------------------- internals
    def _lag_health(self, lag: float) -> None:
        """A replica with max_lag: NOT_SERVING while its lag exceeds it, SERVING again after."""
        if not self.serving:
            return
        over = lag > self.config.max_lag
        self._set_health(
            health_pb2.HealthCheckResponse.NOT_SERVING
            if over
            else health_pb2.HealthCheckResponse.SERVING
        )

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _serve(self) -> None:
        self.gate.open()
        self.metrics.restore_progress.set(1.0)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.checkpointer is not None and self.config.checkpoint_every > 0:
            self.checkpointer.start_periodic(self.config.checkpoint_every)
        if self.config.evict_every > 0 and self.follower is None:
            self.evictor.start_periodic(self.config.evict_every)
        self.restored.set()

    def _restoring_message(self) -> str:
        src = self._restore_from or self.config.restore
        return (
            f"shard {self.config.shard_id} is restoring from {src} "
            f"({100 * self._restore_ratio:.0f}%); retry later"
        )

    def _progress(self, ratio: float) -> None:
        self._restore_ratio = ratio
        self.metrics.restore_progress.set(min(ratio, 0.999))  # 1 only once serving
        hook = self.on_restore_progress
        if hook is not None:
            hook(ratio)

    def _restore_main(self) -> None:
        cfg = self.config
        try:
            self._restore()
        except Exception as e:
            if isinstance(e, CheckpointError | AlreadyExists):
                self.restore_error = str(e)
            else:
                log.exception("shard %d: restore failed unexpectedly", cfg.shard_id)
                self.restore_error = f"{type(e).__name__}: {e}"
            log.error(
                "shard %d/%d: RESTORE FAILED: %s", cfg.shard_id, cfg.num_shards, self.restore_error
            )
            self.restored.set()
            return
        self._serve()

    def _restore(self) -> None:
        """Load the checkpoint ``config.restore`` names, then create the config's tables."""
        cfg = self.config
        assert cfg.restore is not None
        if cfg.restore == "latest":
            assert cfg.checkpoint_dir is not None
            step = latest_step(cfg.checkpoint_dir, cfg.shard_id, cfg.num_shards)
            if step is None:
                log.warning(
                    "shard %d: --restore latest: no complete checkpoint under %s; starting empty",
                    cfg.shard_id,
                    cfg.checkpoint_dir,
                )
                self._create_config_tables("")
                return
            root = Path(cfg.checkpoint_dir)
        else:
            root, step = resolve(cfg.restore, cfg.checkpoint_dir)
        src = root / str(step)
        self._restore_from = str(src)
        log.info("shard %d: restoring from %s", cfg.shard_id, src)
        t0 = time.monotonic()
        tables, summary = restore_tables(root, step, cfg.shard_id, cfg.num_shards, self._progress)
        self.engine.install(tables)
        self._create_config_tables(str(src))
        self.restore_summary = summary
        log.info(
            "shard %d: restored %d tables (%d keys, %.1f MB) from %s (%d shards) in %.2fs",
            cfg.shard_id,
            summary["tables"],
            summary["keys"],
            summary["bytes"] / 1e6,
            src,
            summary["old_shards"],
            time.monotonic() - t0,
        )

    def _create_config_tables(self, src: str) -> None:
        for tc in self.config.tables:
            try:
                self.engine.create_table(tc)
            except AlreadyExists as e:
                raise CheckpointError(
                    f"table {tc.name!r} of the config differs from the one restored from {src} "
                    f"({e}); remove it from the config or restore another checkpoint"
                ) from None


def build_server(config: ShardConfig, engine: Engine | None = None) -> ShardServer:
    """A shard ready to ``start()``: its tables created (after the restore, with
    ``config.restore``), its port bound, its checkpointer set up (with ``checkpoint_dir``).

    engine: an existing engine to serve (tests); None: a new one.
    Raises ValueError for a bad table config, certificate or token file (the message names
    the file), OSError if the port cannot be bound. With ``config.tls_cert`` the port
    serves TLS only (mutual TLS with ``tls_client_ca``); with ``auth_token_file`` every
    call but health needs a bearer token (server/service/auth.py).
    """
    # security first: a bad certificate or token file stops the shard before any work
    creds = None
    if config.tls_cert and config.tls_key:
        creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    authorizer = None
    if config.auth_token_file:
        authorizer = Authorizer(load_token_file(config.auth_token_file))
    if config.replica_of:
        engine = ReplicaEngine(config.replica_of, config.replica_dtype)
    engine = Engine() if engine is None else engine
    if not config.restore:
        for cfg in config.tables:
            engine.create_table(cfg)
    metrics = ShardMetrics(config.shard_id, config.num_shards, engine.tables)
    evictor = Evictor(config.shard_id, engine.tables, metrics)
    checkpointer = None
    if config.checkpoint_dir:
        checkpointer = Checkpointer(
            config.checkpoint_dir,
            config.shard_id,
            config.num_shards,
            engine.tables,
            full_every=config.checkpoint_incremental,
            metrics=metrics,
            before_snapshot=evictor.before_checkpoint,
        )
    gate = ServingGate()
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix=f"embps-shard{config.shard_id}"
        ),
        # AuthInterceptor runs inside ErrorInterceptor: refusals are counted and answered there
        interceptors=[
            ErrorInterceptor(engine, metrics, config.shard_id, gate),
            *([AuthInterceptor(authorizer)] if authorizer is not None else []),
        ],
        options=options,
    )
    servicer = ParameterServerServicer(engine, config, checkpointer, evictor)
    add_servicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )  # fmt: skip
    target = (
        f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    )
    try:
        if creds is not None:
            port = server.add_secure_port(target, creds)
        else:
            port = server.add_insecure_port(target)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {target}: {e} (port in use?)") from None
    if port == 0:
        raise OSError(f"cannot listen on {target} (port in use?)")
    shard = ShardServer(
        config, engine, server, port, health_servicer, metrics, gate, checkpointer, evictor
    )
    shard.authorizer = authorizer
    if isinstance(engine, ReplicaEngine):
        follower = Follower(
            engine, engine.source, config.num_shards, f"replica-{config.shard_id}-{port}",
            config.replica_poll_seconds,
            credentials=follower_credentials(
                config.replica_tls_ca, config.replica_tls_cert, config.replica_tls_key
            ),
            token=read_token(config.replica_token_file),
            checkpoint_dir=config.replica_checkpoint_dir, shard=config.shard_id,
        )  # fmt: skip
        shard.follower = follower
        servicer.follower = follower
        metrics.follow(follower, config.max_lag)
        if config.max_lag > 0:
            follower.on_lag = shard._lag_health
    # the servicer starts with "" SERVING: NOT_SERVING instead, until start() serves
    # (gRPC and /readyz)
    shard._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    return shard
