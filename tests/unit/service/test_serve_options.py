"""``embps serve``'s options are derived from ``ShardConfig`` (server/service/config.py):
one field there is the flag, the config-file key, its type, default and help. These tests
fail if a field marked as an option does not reach the command line, the file, or the
shard's config."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from embps.server import serve
from embps.server.service import ShardConfig

# a value other than the default for each option, valid with the others at their defaults
# (options that need a companion get it from COMPANIONS)
OTHER: dict[str, object] = {
    "shards": 3, "host": "0.0.0.0", "port": 40000, "metrics_port": 41000,
    "max_keys_per_request": 1000, "max_message_bytes": 1 << 20, "max_workers": 3,
    "grace_seconds": 2.5, "drain_delay_seconds": 1.5, "verify_routing": False,
    "checkpoint_dir": "/tmp/ckpt", "checkpoint_every": 30, "checkpoint_incremental": 4,
    "checkpoint_on_exit": False, "restore": "latest", "evict_every": 5,
    "replica_of": "a:1,b:2,c:3", "replica_poll_seconds": 0.5, "max_lag": 7,
    "replica_dtype": "int8", "replica_checkpoint_dir": "/tmp/ck",
    "replica_token_file": "/tmp/token", "replica_tls_ca": "/tmp/ca.pem",
    "replica_tls_cert": "/tmp/c.pem", "replica_tls_key": "/tmp/k.pem",
    "tls_cert": "/tmp/s.pem", "tls_key": "/tmp/s.key", "tls_client_ca": "/tmp/ca.pem",
    "auth_token_file": "/tmp/tokens",
}  # fmt: skip
COMPANIONS: dict[str, dict[str, object]] = {
    "checkpoint_every": {"checkpoint_dir": "/tmp/ckpt"},
    "checkpoint_incremental": {"checkpoint_dir": "/tmp/ckpt"},
    "restore": {"checkpoint_dir": "/tmp/ckpt"},
    "replica_of": {"shards": 3},
    "replica_checkpoint_dir": {"replica_of": "a:1"},
    "tls_cert": {"tls_key": "/tmp/s.key"},
    "tls_key": {"tls_cert": "/tmp/s.pem"},
    "tls_client_ca": {"tls_cert": "/tmp/s.pem", "tls_key": "/tmp/s.key"},
}


def test_every_option_field_is_a_flag_and_a_file_key() -> None:
    marked = {f.name for f in dataclasses.fields(ShardConfig) if "option" in f.metadata}
    assert marked == {f.name for f, _ in serve.OPTIONS.values()}
    assert set(OTHER) == set(serve.OPTIONS), "give each option a test value"
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    for key in serve.OPTIONS:
        assert key in flags and key in serve.SERVER_OPTIONS and key in serve.DEFAULTS, key


@pytest.mark.parametrize("key", sorted(OTHER))
def test_an_option_set_in_the_file_reaches_the_shard(key: str) -> None:
    doc = {"server": {key: OTHER[key], **COMPANIONS.get(key, {})}}
    opts = dict(serve.DEFAULTS) | serve.parse_serve_doc(doc).server
    opts["shard_id"] = None
    cfg = serve.shard_config(opts, (), 0)
    f, _ = serve.OPTIONS[key]
    want = OTHER[key] if key != "replica_of" else "a:1"  # shard 0 follows the first
    assert getattr(cfg, f.name) == want
    assert getattr(cfg, f.name) != getattr(serve.shard_config(_defaults(), (), 0), f.name)


@pytest.mark.parametrize("key", sorted(OTHER))
def test_an_option_given_as_a_flag_reaches_the_shard(key: str) -> None:
    argv: list[str] = []
    for k, v in {key: OTHER[key], **COMPANIONS.get(key, {})}.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, str(v)]
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(argv)
    opts = dict(serve.DEFAULTS) | {k: getattr(args, k) for k in serve.SERVER_OPTIONS
                                   if getattr(args, k) is not None}  # fmt: skip
    opts["shard_id"] = None
    cfg = serve.shard_config(opts, (), 0)
    f, _ = serve.OPTIONS[key]
    want = OTHER[key] if key != "replica_of" else "a:1"
    assert getattr(cfg, f.name) == want


def test_a_wrong_type_in_the_file_names_the_option() -> None:
    with pytest.raises(ValueError, match="server option 'max_workers' has the wrong type"):
        serve.parse_serve_doc({"server": {"max_workers": "eight"}})
    with pytest.raises(ValueError, match="server option 'verify_routing' has the wrong type"):
        serve.parse_serve_doc({"server": {"verify_routing": 1}})


def _defaults() -> dict[str, object]:
    return dict(serve.DEFAULTS) | {"shard_id": None}
