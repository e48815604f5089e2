"""The ``embps`` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``embps --help`` is fast.

gRPC's C core logs on stderr by itself (a failed TLS handshake: ``I...
ssl_transport_security.cc ... Handshake failed ...``). ``embps health`` is a check
for probes and scripts whose output is its own one line, so for it ``main`` sets
``GRPC_VERBOSITY=NONE`` before grpc is first imported (gRPC reads it then, once; the
package ``embps.client`` imports grpc only on first use for this reason). A
``GRPC_VERBOSITY`` the user set wins; other subcommands and library users keep
gRPC's defaults.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "embps.client.demo.job",
        "train a DLRM on synthetic clicks against a local 2-shard PS; write a report",
    ),
    "serve": ("embps.server.serve", "start N local shard processes (gRPC + metrics)"),
    "export": (
        "embps.server.durability.export",
        "write a checkpoint's values for serving (memory-mappable .npy + manifest)",
    ),
    "health": (
        "embps.client.health",
        "check a shard's gRPC health (exit 0 SERVING, 1 not serving, 2 unreachable)",
    ),
}
# subcommands whose stderr is their own messages only: gRPC's C core logs nothing
QUIET_GRPC = frozenset({"health"})
BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": (
        "embps.client.bench.engine",
        "hash map and table throughput beside khash, typed.Dict, dict",
    ),
    "service": (
        "embps.client.bench.service",
        "gRPC pull/push throughput beside a raw echo and Redis",
    ),
    "checkpoint": (
        "embps.client.bench.checkpoint",
        "checkpoint write and restore throughput beside numpy.save / numpy.load",
    ),
    "memory": (
        "embps.client.bench.memory",
        "AUC vs embedding memory: dynamic, static, adaptive, qr, mixed-dim, pruned",
    ),
    "train": (
        "embps.client.bench.train",
        "end-to-end training samples/s through a 2-shard PS beside local torch embeddings",
    ),
    "serving": (
        "embps.client.bench.serving",
        "replica shards beside the training shards they follow: pulls, bytes per key, lag",
    ),
    "soak": (
        "embps.client.bench.soak",
        "several clients push exact gradients for M minutes; verify nothing lost or doubled",
    ),
}


def _load(module: str):
    return importlib.import_module(module)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Parser with the selected subcommand's arguments loaded (others only listed)."""
    parser = argparse.ArgumentParser(
        prog="embps", description="embps: an embedding parameter server"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if argv[:1] == [name]:
            _load(module).add_arguments(p)
            p.set_defaults(_module=module)
    bench = sub.add_parser("bench", help="run a benchmark beside its baseline and print the ratios")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module, help_) in BENCHMARKS.items():
        p = bsub.add_parser(name, help=help_, description=help_)
        if argv[:2] == ["bench", name]:
            _load(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def quiet_grpc_logs() -> None:
    """Turn gRPC's C-core logging off for this process (``GRPC_VERBOSITY=NONE``) unless
    the user set ``GRPC_VERBOSITY``. Effective only before grpc is first imported: if it
    already is (``main`` called in a process that uses grpc), nothing changes."""
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``embps`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in QUIET_GRPC:
        quiet_grpc_logs()
    args = build_parser(argv).parse_args(argv)
    rc: int = _load(args._module).run(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
