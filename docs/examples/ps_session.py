"""What the examples share: a PS to talk to (given, or a local 2-shard one) and counts.

``add_ps_arguments(parser)`` adds ``--addresses host:port,host:port`` (a running
cluster, shard-id order); ``ps_client(args)`` yields a ``PSClient`` on it, or, without
``--addresses``, starts ``embps serve --shards 2`` on loopback the way ``embps demo``
does (``embps.client.demo.localps.LocalPS``), and stops it when the block ends.

The examples import this module as ``ps_session``: run them as scripts
(``python docs/examples/<name>.py``), which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embps.client import PSClient
from embps.client.demo.localps import LocalPS


def add_ps_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--addresses",
        default="",
        help="comma-separated shard addresses of a running PS, in shard-id order "
        "(default: start a local 2-shard PS for this run)",
    )


@contextlib.contextmanager
def ps_client(args: argparse.Namespace) -> Iterator[PSClient]:
    """A client on ``args.addresses``, or on a local 2-shard PS started (and stopped) here."""
    if args.addresses:
        with PSClient([a.strip() for a in args.addresses.split(",")]) as ps:
            yield ps
        return
    with (
        tempfile.TemporaryDirectory(prefix="embps-example-") as tmp,
        LocalPS(2, Path(tmp) / "ps.log") as local,
    ):
        local.start()
        print(f"started a local 2-shard PS on {','.join(local.addresses)}", flush=True)
        with PSClient(local.addresses) as ps:
            ps.wait_ready()
            yield ps


def table_parameters(ps: PSClient, table: str) -> int:
    """Floats the PS holds for ``table``'s values (own rows + shared rows, every shard,
    times dim; optimizer slots not counted): what a Keras summary calls parameters."""
    dim = {t.name: t.dim for t in ps.describe_tables()}[table]
    rows = 0
    for shard in ps.stats(table):
        t = shard.tables[table]
        rows += int(t["keys"]) + int(t["static_rows"])
    return rows * dim
