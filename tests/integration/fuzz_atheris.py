"""atheris fuzzer of a live shard (run by tests/integration/test_fuzz.py in a subprocess).

    python tests/integration/fuzz_atheris.py -runs=2000 -max_total_time=60

Starts its own shard (``fuzz_requests.start_shard``), then atheris mutates
byte strings that a ``FuzzedDataProvider`` turns into requests: a method, a
table (live, fuzz, or any string), keys, gradients, enums, floats and config
fields straight from the fuzzer's bytes, and every tenth input sent as raw
bytes. The same rule as the hypothesis test keeps live tables unchanged
(``guard``). Every answer is checked; every VERIFY_EVERY inputs the shard's
health and the live tables' checksum are verified. libFuzzer exits the
process from C when it is done (no Python exit handlers run), so the results
go to the JSON file ``$EMBPS_FUZZ_STATUS`` after every check; an assertion
failure makes atheris report a crash (nonzero exit).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import atheris
import grpc
import numpy as np

with atheris.instrument_imports():
    from embps.protos import codec
    from embps.protos import config as _config  # noqa: F401  (coverage of the config checks)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_requests import (
    FUZZ_NAMES,
    LIVE_NAMES,
    METHODS,
    N_SHARDS,
    OWNED,
    Request,
    call,
    check_answer,
    checksum,
    guard,
    serving,
    start_shard,
)

from embps.v1 import embps_pb2 as pb

VERIFY_EVERY = 250
STATUS = Path(os.environ.get("EMBPS_FUZZ_STATUS", "fuzz-status.json"))
WORK = Path(os.environ.get("EMBPS_FUZZ_DIR") or tempfile.mkdtemp(prefix="embps-fuzz-"))

shard = start_shard(WORK / "checkpoints")
baseline = checksum(shard.engine)
channel = grpc.insecure_channel(shard.address)
state: dict = {"checked": 0, "verified": 0, "codes": Counter(), "failures": []}
METHOD_NAMES = sorted(METHODS)
SIZES = [0, 1, 2, 16, 64, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def write_status() -> None:
    out = {**state, "codes": dict(state["codes"])}
    tmp = STATUS.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(STATUS)


def verify() -> None:
    ok = serving(shard.address)
    now = checksum(shard.engine)
    changed = [n for n in LIVE_NAMES if now[n] != baseline[n]]
    if not ok or changed:
        state["failures"].append(f"serving={ok} changed={changed}")
    state["verified"] += 1
    write_status()
    assert ok and not changed, state["failures"][-1]


def table_name(fdp: atheris.FuzzedDataProvider) -> str:
    pick = fdp.ConsumeIntInRange(0, 3)
    if pick == 0:
        return LIVE_NAMES[fdp.ConsumeIntInRange(0, len(LIVE_NAMES) - 1)]
    if pick == 1:
        return FUZZ_NAMES[fdp.ConsumeIntInRange(0, len(FUZZ_NAMES) - 1)]
    name = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    return "fz_" + name if name in LIVE_NAMES else name


def key_bytes(fdp: atheris.FuzzedDataProvider) -> bytes:
    if fdp.ConsumeBool():
        n = fdp.ConsumeIntInRange(0, 300)
        start = fdp.ConsumeIntInRange(0, len(OWNED) - 1)
        return codec.encode_keys(np.roll(OWNED, -start)[:n])
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120))


def build(fdp: atheris.FuzzedDataProvider) -> Request:
    method = METHOD_NAMES[fdp.ConsumeIntInRange(0, len(METHOD_NAMES) - 1)]
    i32 = lambda: fdp.ConsumeIntInRange(-(2**31), 2**31 - 1)  # noqa: E731
    u32 = lambda: fdp.ConsumeIntInRange(0, 2**32 - 1)  # noqa: E731
    size = lambda: SIZES[fdp.ConsumeIntInRange(0, len(SIZES) - 1)]  # noqa: E731
    shards = lambda: N_SHARDS if fdp.ConsumeBool() else u32()  # noqa: E731
    if method == "Pull":
        keys = key_bytes(fdp)
        msg = pb.PullRequest(table=table_name(fdp), keys=keys, train=fdp.ConsumeBool(),
                             num_shards=shards(), dtype=i32() if fdp.ConsumeBool() else 0,
                             mask=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))  # fmt: skip
    elif method == "Push":
        keys = key_bytes(fdp)
        msg = pb.PushRequest(table=table_name(fdp), keys=keys, num_shards=shards(),
                             dtype=fdp.ConsumeIntInRange(0, 5),
                             grads=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, len(keys) * 8 + 8)))  # fmt: skip
        if fdp.ConsumeBool():
            msg.step = fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
    elif method == "CreateTable":
        c = pb.TableConfig(
            name=table_name(fdp), dim=[0, 1, 2, 4, 65536, 65537][fdp.ConsumeIntInRange(0, 5)],
            kind=fdp.ConsumeIntInRange(-1, 5), initial_capacity=size(), max_rows=size(),
            max_bytes=size(), hash_bucket_size=size(), promote_threshold=fdp.ConsumeIntInRange(0, 3),
            admission_threshold=fdp.ConsumeIntInRange(0, 3), eviction=fdp.ConsumeIntInRange(-1, 5),
            sketch_width=[0, 1, 3, 64, 2**31 + 1][fdp.ConsumeIntInRange(0, 4)],
            sketch_depth=fdp.ConsumeIntInRange(0, 20), qr_quotient_buckets=size(),
            qr_remainder_buckets=size(), qr_combiner=fdp.ConsumeIntInRange(-1, 5),
            default_value=fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat(),
            l2_evict_threshold=fdp.ConsumeFloat(),
        )  # fmt: skip
        which = fdp.ConsumeIntInRange(0, 4)
        if which == 1:
            c.optimizer.sgd.lr = fdp.ConsumeFloat()
        elif which == 2:
            c.optimizer.adam.CopyFrom(pb.Adam(lr=fdp.ConsumeFloat(), beta1=fdp.ConsumeFloat(),
                                              beta2=fdp.ConsumeFloat(), eps=fdp.ConsumeFloat()))  # fmt: skip
        elif which == 3:
            c.optimizer.ftrl.CopyFrom(pb.Ftrl(alpha=fdp.ConsumeFloat(), beta=fdp.ConsumeFloat(),
                                              l1=fdp.ConsumeFloat(), l2=fdp.ConsumeFloat()))  # fmt: skip
        elif which == 4:
            c.optimizer.adagrad.CopyFrom(pb.Adagrad(lr=fdp.ConsumeFloat(), eps=fdp.ConsumeFloat()))
        msg = pb.CreateTableRequest(config=c)
    elif method == "DropTable":
        msg = pb.DropTableRequest(name=table_name(fdp))
    elif method == "Prune":
        msg = pb.PruneRequest(table=table_name(fdp), threshold=fdp.ConsumeFloat(), norm=i32(),
                              num_shards=shards())  # fmt: skip
    elif method == "Checkpoint":
        msg = pb.CheckpointRequest(step=size(), kind=i32(), num_shards=u32())
    elif method == "Frequencies":
        msg = pb.FrequenciesRequest(table=table_name(fdp), keys=key_bytes(fdp), num_shards=shards())
    elif method == "Stats":
        msg = pb.StatsRequest(table=table_name(fdp))
    else:
        msg = pb.DescribeTablesRequest()
    return guard(Request(method, msg), fdp.ConsumeIntInRange(0, 2**16))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 9) == 0:  # raw bytes: not even a valid message, mostly
        method = METHOD_NAMES[fdp.ConsumeIntInRange(0, len(METHOD_NAMES) - 1)]
        raw = fdp.ConsumeBytes(fdp.remaining_bytes())
        if method in ("Pull", "Push", "Prune", "DropTable") and any(
            n.encode() in raw for n in LIVE_NAMES
        ):
            return  # could be a valid mutation of a live table: not this rule's business
        code, details, _ = call(channel, method, raw)
        state["codes"][code.name] += 1
        assert code.name in {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION",
                             "RESOURCE_EXHAUSTED", "ALREADY_EXISTS"}, (method, raw, details)  # fmt: skip
    else:
        req = build(fdp)
        code, details, resp = call(channel, req.method, req.data())
        state["codes"][code.name] += 1
        try:
            check_answer(req, code, details, resp)
        except AssertionError as e:
            state["failures"].append(str(e)[:1000])
            write_status()
            raise
    state["checked"] += 1
    if state["checked"] % VERIFY_EVERY == 0:
        verify()


def main() -> None:
    write_status()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
