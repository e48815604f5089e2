"""Drive an embps cluster with PSClient from a separate process: JSON steps in, results out.

    python tests/deploy/ps_driver.py < request.json

request: {"address": "embps-{i}.embps-headless:50051", "num_shards": 2,
          "tls": {"ca": PATH, "cert": PATH, "key": PATH} (optional),
          "token": "..." (optional), "steps": [[verb, args...], ...]}
verbs:   ["wait_ready", seconds]           -> null
         ["describe"]                      -> [[name, dim, kind], ...] (sorted by name)
         ["create", {TableConfig fields}]  -> null
         ["pull", table, keys, train]      -> rows, list of float lists (float32, exact)
         ["push", table, keys, grad]       -> null (every gradient = grad)
         ["checkpoint", step]              -> [[shard_id, path, kind], ...]
         ["expect_error", step]            -> the error's class name after running ``step``
stdout:  a JSON list, one result per step. Any other failure: a traceback, exit 1.

tests/deploy/containers.py runs it in a mount namespace whose /etc/hosts maps the
pods' DNS names, so the address pattern is the one clients use in Kubernetes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from embps.client import PSClient, TLSConfig
from embps.protos.config import TableConfig


def run_step(ps: PSClient, verb: str, *args: Any) -> Any:
    if verb == "wait_ready":
        ps.wait_ready(timeout=float(args[0]))
        return None
    if verb == "describe":
        return sorted([t.name, t.dim, t.kind.name.lower()] for t in ps.describe_tables())
    if verb == "create":
        ps.create_table(TableConfig.from_dict(args[0]))
        return None
    if verb == "pull":
        table, keys, train = args
        return ps.pull(table, np.asarray(keys, dtype=np.int64), train=bool(train)).tolist()
    if verb == "push":
        table, keys, grad = args
        dim = ps.describe_tables()
        (cfg,) = [t for t in dim if t.name == table]
        grads = np.full((len(keys), cfg.dim), float(grad), dtype=np.float32)
        ps.push(table, np.asarray(keys, dtype=np.int64), grads)
        return None
    if verb == "checkpoint":
        return [[r.shard_id, r.path, r.kind] for r in ps.checkpoint(int(args[0]))]
    if verb == "expect_error":
        try:
            run_step(ps, *args[0])
        except Exception as e:
            return type(e).__name__
        raise AssertionError(f"step {args[0]} did not fail")
    raise ValueError(f"unknown verb {verb!r}")


def main() -> int:
    request = json.load(sys.stdin)
    tls = request.get("tls")
    client = PSClient(
        request["address"],
        num_shards=int(request["num_shards"]),
        timeout=float(request.get("timeout", 120)),
        retry_deadline=float(request.get("retry_deadline", 60)),
        tls=TLSConfig(**tls) if tls else None,
        token=request.get("token"),
    )
    with client as ps:
        results = [run_step(ps, *step) for step in request["steps"]]
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
