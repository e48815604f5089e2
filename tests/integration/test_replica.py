"""Serving replicas follow training shards: real `embps serve` processes on loopback.

A 2-shard training PS and `embps serve --replica-of` replicas (one per shard). The
replicas must answer every inference pull exactly as the training shards do (float32
rows, every table kind, after pulls, pushes, promotions, evictions and prunes), refuse
writes, report their lag, keep serving while the training shard is down, and
resynchronise to a restored training shard without ever mixing the two histories.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.cluster import start_shard, wait_until

from embps.client import Adagrad, PSClient, TableConfig
from embps.client.exceptions import (
    EmbpsError,
    ReadOnlyReplicaError,
    ShardMismatchError,
    TableNotFoundError,
)
from embps.protos.config import Initializer
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

DIM = 8
CONFIGS = [
    TableConfig("dyn", DIM, optimizer=Adagrad(lr=0.1), steps_to_live=4, admission_threshold=2),
    TableConfig(
        "ada",
        DIM,
        kind="adaptive",
        hash_bucket_size=32,
        promote_threshold=3,
        optimizer=Adagrad(lr=0.1),
    ),
    TableConfig("st", DIM, kind="static", hash_bucket_size=32, initializer=Initializer("normal")),
    TableConfig(
        "qr", DIM, kind="qr", qr_quotient_buckets=8, qr_remainder_buckets=8, qr_combiner="concat"
    ),
]
PROBE = np.arange(-20, 400, dtype=np.int64)  # keys with and without rows, every kind
REPLICA_ARGS = ("--replica-poll-seconds", "0.05", "--evict-every", "0")


def train(ps: PSClient, steps: range, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for step in steps:
        for cfg in CONFIGS:
            keys = rng.integers(0, 300, 120)
            ps.pull(cfg.name, keys)
            grads = rng.normal(0, 1, (keys.size, DIM)).astype(np.float32)
            ps.push(cfg.name, keys, grads, step=step)


def rows(ps: PSClient) -> dict[str, np.ndarray]:
    return {c.name: ps.pull(c.name, PROBE, train=False) for c in CONFIGS}


def converged(train_ps: PSClient, rep: PSClient) -> bool:
    try:
        want, got = rows(train_ps), rows(rep)
    except (TableNotFoundError, EmbpsError):
        return False
    return all(np.array_equal(want[t], got[t]) for t in want)


def wait_converged(train_ps: PSClient, rep: PSClient, what: str, timeout: float = 20) -> float:
    t0 = time.monotonic()
    wait_until(lambda: converged(train_ps, rep), timeout=timeout, what=what, interval=0.05)
    return time.monotonic() - t0


def test_replicas_answer_exactly_as_the_training_shards(cluster_factory) -> None:
    trainer = cluster_factory(2, "--evict-every", "0")
    with PSClient(trainer.addresses) as ps:
        for cfg in CONFIGS:
            ps.create_table(cfg)
        train(ps, range(0, 3), seed=1)
        replicas = cluster_factory(2, "--replica-of", ",".join(trainer.addresses), *REPLICA_ARGS)
        with PSClient(replicas.addresses) as rep:
            wait_converged(ps, rep, "the replicas' bootstrap")
            # more training: promotions, new rows, static and qr updates
            train(ps, range(3, 8), seed=2)
            assert sum(s.tables["ada"]["promotions"] for s in ps.stats("ada")) > 0
            wait_converged(ps, rep, "after more training")
            # evictions (steps_to_live) and prunes delete rows: the replicas drop them too
            ev = ps.evict("dyn")["dyn"].rows
            pr = ps.prune("ada", threshold=10.0).rows
            assert ev > 0 and pr > 0
            wait_converged(ps, rep, "after eviction and prune")
            assert [s.tables["dyn"]["keys"] for s in rep.stats("dyn")] == [
                s.tables["dyn"]["keys"] for s in ps.stats("dyn")
            ]
            # a table dropped and created again on the training shards
            ps.drop_table("st")
            ps.create_table(TableConfig("st", DIM, kind="static", hash_bucket_size=16))
            wait_converged(ps, rep, "after a table was created again")
            # replicas say what they are and how fresh
            st = rep.stats()
            assert [s.shard_id for s in st] == [0, 1]
            for s, stub in zip(st, _stubs(replicas.addresses), strict=True):
                resp = stub.Stats(pb.StatsRequest(), timeout=10)
                assert resp.replica_of == trainer.addresses[s.shard_id]
                assert 0 <= resp.lag_seconds < 5
            for shard in replicas.shards:  # /metrics serves (the liveness probe reads it)
                url = f"http://127.0.0.1:{shard.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=10) as r:
                    text = r.read().decode()
                assert "embps_replica_lag_seconds" in text
                assert 'embps_table_keys{table="dyn"}' in text


def _within_rounding(dtype: str, want: np.ndarray, got: np.ndarray) -> bool:
    """float16: exactly the training rows rounded to half precision; int8: each element
    within half a quantization step of its row ((max - min) / 255 / 2; concat halves are
    quantized apart, with a step no larger than the whole row's)."""
    if dtype == "float16":
        return bool(np.array_equal(got, want.astype(np.float16).astype(np.float32)))
    step = (want.max(axis=1, keepdims=True) - want.min(axis=1, keepdims=True)) / 255.0
    return bool((np.abs(got - want) <= step / 2 * 1.001 + 1e-6).all())


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_float16_and_int8_replicas_answer_within_their_rounding(cluster_factory, dtype) -> None:
    trainer = cluster_factory(2, "--evict-every", "0")
    with PSClient(trainer.addresses) as ps:
        for cfg in CONFIGS:
            ps.create_table(cfg)
        train(ps, range(0, 3), seed=5)
        reps = cluster_factory(2, "--replica-of", ",".join(trainer.addresses), *REPLICA_ARGS,
                               "--replica-dtype", dtype)  # fmt: skip
        with PSClient(reps.addresses) as rep:

            def close() -> bool:
                try:
                    want, got = rows(ps), rows(rep)
                except (TableNotFoundError, EmbpsError):
                    return False
                return all(_within_rounding(dtype, want[t], got[t]) for t in want)

            wait_until(close, timeout=20, what=f"a {dtype} replica's bootstrap", interval=0.05)
            train(ps, range(3, 6), seed=6)
            assert ps.prune("ada", threshold=10.0).rows > 0
            wait_until(close, timeout=20, what=f"a {dtype} replica after training", interval=0.05)
            got = rows(rep)
            assert not all(np.array_equal(got[t], rows(ps)[t]) for t in got), "no rounding at all?"
            # what it keeps: values in its dtype, no slots, no per-row metadata
            keys = [s.tables["dyn"]["keys"] for s in ps.stats("dyn")]
            assert [s.tables["dyn"]["keys"] for s in rep.stats("dyn")] == keys
            trained = sum(s.tables["dyn"]["bytes"] for s in ps.stats("dyn"))
            served = sum(s.tables["dyn"]["bytes"] for s in rep.stats("dyn"))
            assert served < 0.5 * trained, (served, trained)


def _stubs(addresses: list[str]) -> list[pb_grpc.ParameterServerStub]:
    return [pb_grpc.ParameterServerStub(grpc.insecure_channel(a)) for a in addresses]


def test_replicas_refuse_writes_and_change_nothing(cluster_factory) -> None:
    trainer = cluster_factory(2, "--evict-every", "0")
    with PSClient(trainer.addresses) as ps:
        ps.create_table(CONFIGS[0])
        train_keys = np.arange(50)
        ps.pull("dyn", train_keys)
        ps.pull("dyn", train_keys)
        replicas = cluster_factory(2, "--replica-of", ",".join(trainer.addresses), *REPLICA_ARGS)
        with PSClient(replicas.addresses, retry_deadline=1.0) as rep:
            wait_until(lambda: converged_one(ps, rep), timeout=20, what="bootstrap")
            before = rep.pull("dyn", train_keys, train=False)
            refusals = {
                "push": lambda: rep.push("dyn", [1], np.ones((1, DIM), np.float32)),
                "training pull": lambda: rep.pull("dyn", [1]),
                "create": lambda: rep.create_table(TableConfig("x", 4)),
                "drop": lambda: rep.drop_table("dyn"),
                "prune": lambda: rep.prune("dyn", 1.0),
                "evict": lambda: rep.evict(),
                "push_pull": lambda: rep.push_pull(
                    {"dyn": ([1], np.ones((1, DIM), np.float32))}, {"dyn": [2]}
                ),
            }
            for what, call in refusals.items():
                with pytest.raises(ReadOnlyReplicaError, match="read-only replica") as info:
                    call()
                assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, what
                assert isinstance(info.value, ShardMismatchError)  # catches of the code still work
            np.testing.assert_array_equal(rep.pull("dyn", train_keys, train=False), before)
            assert rep.pull_many({"dyn": train_keys}, train=False)["dyn"].shape == (50, DIM)


def converged_one(ps: PSClient, rep: PSClient) -> bool:
    try:
        keys = np.arange(60)
        return np.array_equal(ps.pull("dyn", keys, train=False), rep.pull("dyn", keys, train=False))
    except EmbpsError:
        return False


def test_lag_stays_bounded_under_a_steady_push_load(cluster_factory) -> None:
    trainer = cluster_factory(2, "--evict-every", "0")
    with PSClient(trainer.addresses) as ps:
        ps.create_table(TableConfig("t", 16, optimizer=Adagrad(lr=0.05)))
        ps.pull("t", np.arange(20_000))
        replicas = cluster_factory(2, "--replica-of", ",".join(trainer.addresses), *REPLICA_ARGS)
        stubs = _stubs(replicas.addresses)
        wait_until(lambda: all(s.Stats(pb.StatsRequest(), timeout=5).tables for s in stubs),
                   timeout=20, what="bootstrap")  # fmt: skip
        rng = np.random.default_rng(0)
        lags: list[float] = []
        deadline = time.monotonic() + 6.0
        step = 0
        while time.monotonic() < deadline:  # about 4096 rows pushed per step, bounded time
            keys = rng.integers(0, 20_000, 4096)
            ps.push("t", keys, np.full((keys.size, 16), 0.01, np.float32), step=step)
            step += 1
            lags += [s.Stats(pb.StatsRequest(), timeout=5).lag_seconds for s in stubs]
        lag = np.array(lags)
        p50, p99 = float(np.percentile(lag, 50)), float(np.percentile(lag, 99))
        print(f"replica lag under {step} pushes of 4096 keys in 6 s: p50 {p50:.3f} s, "
              f"p99 {p99:.3f} s")  # fmt: skip
        assert p99 <= 2.0, (p50, p99)
        with PSClient(replicas.addresses) as rep:
            wait_until(lambda: np.array_equal(ps.pull("t", np.arange(500), train=False),
                                              rep.pull("t", np.arange(500), train=False)),
                       timeout=20, what="catching up after the load")  # fmt: skip


def test_a_killed_replica_restarts_and_catches_up(cluster_factory, tmp_path: Path) -> None:
    trainer = cluster_factory(2, "--evict-every", "0")
    with PSClient(trainer.addresses) as ps:
        for cfg in CONFIGS:
            ps.create_table(cfg)
        train(ps, range(0, 3), seed=3)
        reps = [start_shard(i, 2, "--replica-of", ",".join(trainer.addresses), *REPLICA_ARGS,
                            log_dir=tmp_path) for i in range(2)]  # fmt: skip
        try:
            addresses = [r.shards[0].address for r in reps]
            with PSClient(addresses) as rep:
                wait_converged(ps, rep, "bootstrap")
            reps[1].proc.send_signal(signal.SIGKILL)
            reps[1].proc.wait(timeout=10)
            train(ps, range(3, 6), seed=4)  # the training goes on while replica 1 is down
            port = int(addresses[1].rsplit(":", 1)[1])
            reps[1] = start_shard(1, 2, "--replica-of", ",".join(trainer.addresses),
                                  *REPLICA_ARGS, port=port, log_dir=tmp_path)  # fmt: skip
            with PSClient(addresses) as rep:
                took = wait_converged(ps, rep, "the restarted replica catching up")
            print(f"a restarted replica caught up (a full resync from the feed) in {took:.2f} s")
        finally:
            for r in reps:
                r.kill_all()


def test_a_replica_starts_from_the_training_checkpoint(cluster_factory, tmp_path: Path) -> None:
    """--replica-checkpoint-dir: the replica serves the newest checkpoint at once, then asks
    the training shard only for what changed since (no resync: same epoch); with the
    training shards gone, it serves the checkpoint and reports its age as lag."""
    ck = tmp_path / "ck"
    trainer = cluster_factory(2, "--evict-every", "0", "--checkpoint-dir", str(ck),
                              "--no-checkpoint-on-exit")  # fmt: skip
    follow = ("--replica-of", ",".join(trainer.addresses), *REPLICA_ARGS,
              "--replica-checkpoint-dir", str(ck))  # fmt: skip
    with PSClient(trainer.addresses) as ps:
        for cfg in CONFIGS:
            ps.create_table(cfg)
        train(ps, range(0, 3), seed=7)
        ps.checkpoint(3)
        at_checkpoint = rows(ps)
        train(ps, range(3, 6), seed=8)  # changes after the checkpoint: the feed brings them
        reps = cluster_factory(2, *follow)
        with PSClient(reps.addresses) as rep:
            wait_converged(ps, rep, "a replica started from the checkpoint")
        for stub in _stubs(reps.addresses):
            assert stub.Stats(pb.StatsRequest(), timeout=5).resyncs == 0  # followed on
    trainer.kill_all()
    t0 = time.monotonic()
    alone = cluster_factory(2, *follow)  # nothing to follow: the checkpoint alone
    with PSClient(alone.addresses, retry_deadline=1.0) as rep:

        def loaded() -> bool:
            try:
                return bool(rows(rep))
            except EmbpsError:
                return False

        wait_until(loaded, timeout=20, what="the checkpoint loaded", interval=0.05)
        got = rows(rep)
    for t in at_checkpoint:
        np.testing.assert_array_equal(got[t], at_checkpoint[t])
    lag = _stubs(alone.addresses)[0].Stats(pb.StatsRequest(), timeout=5).lag_seconds
    assert lag > time.monotonic() - t0  # at least as old as this part of the test


def test_a_restored_training_shard_resynchronises_its_replicas(
    cluster_factory, tmp_path: Path
) -> None:
    ck = tmp_path / "ck"
    trains = [start_shard(i, 2, "--checkpoint-dir", str(ck), "--evict-every", "0",
                          "--no-checkpoint-on-exit", log_dir=tmp_path) for i in range(2)]  # fmt: skip
    addresses = [t.shards[0].address for t in trains]
    reps = []
    try:
        with PSClient(addresses) as ps:
            for cfg in CONFIGS:
                ps.create_table(cfg)
            train(ps, range(0, 3), seed=5)
            ps.checkpoint(1)
            at_checkpoint = rows(ps)
            train(ps, range(3, 6), seed=6)  # history the restore will lose
            reps = [start_shard(i, 2, "--replica-of", ",".join(addresses), *REPLICA_ARGS,
                                log_dir=tmp_path) for i in range(2)]  # fmt: skip
            rep_addresses = [r.shards[0].address for r in reps]
            with PSClient(rep_addresses, retry_deadline=1.0) as rep:
                wait_converged(ps, rep, "bootstrap")
                after = rows(rep)
        # kill -9 training shard 0: the replicas keep serving what they have, lag grows
        trains[0].proc.send_signal(signal.SIGKILL)
        trains[0].proc.wait(timeout=10)
        stub = _stubs(rep_addresses)[0]
        lag0 = stub.Stats(pb.StatsRequest(), timeout=5).lag_seconds
        time.sleep(1.0)
        assert stub.Stats(pb.StatsRequest(), timeout=5).lag_seconds > lag0 + 0.5
        with PSClient(rep_addresses) as rep:
            got = rows(rep)
            for t in got:
                np.testing.assert_array_equal(got[t], after[t])  # still serving
        # restore shard 0 from the checkpoint: versions go back; the replica resyncs
        port = int(addresses[0].rsplit(":", 1)[1])
        trains[0] = start_shard(0, 2, "--checkpoint-dir", str(ck), "--restore", str(ck / "1"),
                                "--evict-every", "0", "--no-checkpoint-on-exit", port=port,
                                log_dir=tmp_path)  # fmt: skip
        with PSClient(addresses) as ps, PSClient(rep_addresses) as rep:
            wait_until(lambda: stub.Stats(pb.StatsRequest(), timeout=5).resyncs >= 1
                       and converged(ps, rep), timeout=30, what="resync")  # fmt: skip
            # shard 0's keys came back to the checkpoint's rows, shard 1's kept theirs: the
            # replicas answer both as the training shards do, never the lost history
            restored = rows(ps)
            from embps.protos.routing import shard_of

            mine = shard_of(PROBE, 2) == 0
            for t in restored:
                if t in ("st", "qr"):  # shared rows of shard 0
                    continue
                np.testing.assert_array_equal(restored[t][mine], at_checkpoint[t][mine])
    finally:
        for p in [*trains, *reps]:
            p.kill_all()


def test_feed_requests_are_checked(cluster_factory) -> None:
    trainer = cluster_factory(1, "--evict-every", "0")
    with PSClient(trainer.addresses) as ps:
        ps.create_table(CONFIGS[0])
        ps.pull("dyn", np.arange(10))
        ps.pull("dyn", np.arange(10))
        before = ps.pull("dyn", np.arange(10), train=False)
    (stub,) = _stubs(trainer.addresses)
    cases = [
        (pb.ChangesRequest(table="nope", num_shards=1), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            pb.ChangesRequest(table="dyn", num_shards=2),
            grpc.StatusCode.FAILED_PRECONDITION,
            "shard count",
        ),
    ]
    for req, code, match in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Changes(req, timeout=5)
        assert info.value.code() == code and match in (info.value.details() or "")
    # a version from another epoch asks for a resync; a bootstrap round pages everything
    resp = stub.Changes(pb.ChangesRequest(table="dyn", num_shards=1, since_version=5,
                                          epoch="other"), timeout=5)  # fmt: skip
    assert resp.resync
    page = stub.Changes(pb.ChangesRequest(table="dyn", num_shards=1, max_rows=4), timeout=5)
    assert len(page.keys) == 4 * 8 and page.next_cursor > 0 and not page.resync
    with PSClient(trainer.addresses) as ps:
        np.testing.assert_array_equal(ps.pull("dyn", np.arange(10), train=False), before)


def test_replica_flags_are_checked(cluster_factory) -> None:
    bad = cluster_factory(None, "--shards", "2", "--port", "0", "--metrics-port", "0",
                          "--replica-of", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3")  # fmt: skip
    assert bad.wait() == 2 and "one host:port per shard" in bad.log()
    bad = cluster_factory(None, "--shards", "1", "--port", "0", "--metrics-port", "0",
                          "--replica-of", "127.0.0.1:1", "--checkpoint-dir", "/tmp/x")  # fmt: skip
    assert bad.wait() == 2 and "checkpoint_dir" in bad.log()


def test_a_replica_follows_a_mutual_tls_shard_with_a_read_token(
    cluster_factory, tmp_path: Path
) -> None:
    from support.certs import make_certs

    from embps.client import TLSConfig

    certs = make_certs(tmp_path / "certs")
    tokens = tmp_path / "tokens"
    tokens.write_text("read r3ad-token-0123456789\nadmin wr1te-token-0123456789\n")
    (tmp_path / "replica-token").write_text("# the replica's read token\nr3ad-token-0123456789\n")
    (tmp_path / "wrong-token").write_text("not-a-token-0123456789\n")
    trainer = cluster_factory(1, "--evict-every", "0", "--tls-cert", certs.server_cert,
                              "--tls-key", certs.server_key, "--tls-client-ca", certs.ca,
                              "--auth-token-file", str(tokens))  # fmt: skip
    tls = TLSConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    follow = ("--replica-of", trainer.addresses[0], *REPLICA_ARGS, "--replica-tls-ca", certs.ca,
              "--replica-tls-cert", certs.client_cert, "--replica-tls-key", certs.client_key)  # fmt: skip
    with PSClient(trainer.addresses, tls=tls, token="wr1te-token-0123456789") as ps:
        ps.create_table(CONFIGS[1])
        ps.pull("ada", np.arange(100))
        ps.push("ada", np.arange(100), np.ones((100, DIM), np.float32), step=1)
        good = cluster_factory(1, *follow, "--replica-token-file", str(tmp_path / "replica-token"))
        bad = cluster_factory(1, *follow, "--replica-token-file", str(tmp_path / "wrong-token"))
        with PSClient(good.addresses) as rep:
            wait_until(lambda: _same(ps, rep, "ada"), timeout=20, what="following over mTLS")
        (stub,) = _stubs(bad.addresses)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(bad.addresses[0]))
        time.sleep(1.0)  # several polls: every one refused (UNAUTHENTICATED)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # never synced
        assert "UNAUTHENTICATED" in bad.log()
        assert stub.Stats(pb.StatsRequest(), timeout=5).tables == []


def _same(ps: PSClient, rep: PSClient, table: str) -> bool:
    try:
        keys = np.arange(-5, 120)
        return np.array_equal(ps.pull(table, keys, train=False), rep.pull(table, keys, train=False))
    except EmbpsError:
        return False
