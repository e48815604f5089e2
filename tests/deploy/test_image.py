"""The image, built and run: size, user, writable paths, HEALTHCHECK, drain, restore.

The image is built once per session (tests/deploy/containers.py: `make image`'s
deploy/image/build.py, cached by a hash of its inputs). Then, with podman:

- the default command, run as `docker run` would run it: one shard as uid
  10001, HEALTHCHECK healthy, writes only under the paths the Dockerfile makes
  writable, drains on `podman stop`;
- two shards run the way the dev overlay's StatefulSet runs them: its args
  (``$(VAR)`` expanded as the kubelet does), env, user, read-only root
  filesystem, dropped capabilities, memory and CPU limits, the ConfigMap's file
  at /etc/embps, /tmp and the numba cache as the emptyDirs. A client on the host
  creates a table, pulls, pushes and checkpoints to the mounted checkpoint
  directory; `podman healthcheck run` passes; `podman stop` drains (exit 0, the
  exit checkpoint); new containers restore the newest checkpoint with the rows
  intact.

The two shards share one checkpoint directory (a ReadWriteMany volume): with a
volume per pod, as the manifests' volumeClaimTemplate gives, no shard sees a
complete checkpoint and `--restore latest` starts empty (test_kube_play.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.cluster import wait_until

from .containers import (
    GRPC_PORT,
    METRICS_PORT,
    Image,
    Podman,
    PodPlan,
    built_image,
    http_get,
    loopback_addresses,
    probe,
    statefulset_pods,
    wait_started,
)

pytestmark = pytest.mark.container

UID = 10001  # the Dockerfile's USER
# Size budget of what the Dockerfile adds to its base (the venv, the user): 338 MB
# measured (numpy 2.4 / numba 0.68 / grpcio 1.85). llvmlite's LLVM is half of it
# (173 MB), numpy with its OpenBLAS 73 MB, numba 35 MB, grpcio 19 MB, pip and
# setuptools 25 MB, protobuf, PyYAML, prometheus-client and embps the rest. The
# budget leaves ~12% for dependency growth; a compiler, a pip cache, the tests or
# a second copy of the venv would each break it.
ADDED_BUDGET_BYTES = 380_000_000
# The whole image: the pinned python:3.11-slim base is ~125 MB; the Debian
# stand-in base (debootstrap minbase + python3, no docs) ~180 MB.
TOTAL_BUDGET_BYTES = {"pinned": 500_000_000, "standin": 560_000_000}
WRITABLE = ("/var/lib/embps/checkpoints", "/var/cache/embps/numba")  # the Dockerfile's
ENGINE_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv")
STOP_GRACE_S = 60


@pytest.fixture(scope="module")
def image() -> Image:
    return built_image()


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    p = Podman(tmp_path_factory.mktemp("podman"))
    p.remove_stale()
    try:
        yield p
    finally:
        p.cleanup()


def client(addresses: list[str]) -> Any:
    from embps.client import PSClient

    return PSClient(addresses, timeout=120, retry_deadline=60)


# --------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------


def test_image_size_is_within_budget(image: Image, podman: Podman) -> None:
    added = image.size - image.base_size
    print(f"\n{image.image}: {image.size / 1e6:.0f} MB ({image.base_kind} base {image.base_size / 1e6:.0f} MB + {added / 1e6:.0f} MB), {'cached' if image.cached else f'built in {image.seconds:.0f}s'}")  # fmt: skip
    if added > ADDED_BUDGET_BYTES or image.size > TOTAL_BUDGET_BYTES[image.base_kind]:
        du = podman(
            "run", "--rm", "--entrypoint", "sh", image.image, "-c",
            "du -sk /opt/venv/lib/python3*/site-packages/* | sort -n | tail -12",
        ).stdout  # fmt: skip
        pytest.fail(
            f"the image is {image.size / 1e6:.0f} MB, {added / 1e6:.0f} MB over its base "
            f"(budgets: {ADDED_BUDGET_BYTES / 1e6:.0f} MB added, "
            f"{TOTAL_BUDGET_BYTES[image.base_kind] / 1e6:.0f} MB in all). Largest packages (kB):\n{du}"
        )


# --------------------------------------------------------------------------
# The default command, as `docker run` runs it
# --------------------------------------------------------------------------


def _diff_outside(changes: list[str], allowed: tuple[str, ...]) -> list[str]:
    """`podman diff` lines whose path is not an allowed path, under one, or a parent of one."""
    bad = []
    for line in changes:
        kind, _, path = line.partition(" ")
        path = path.strip()
        if any(path == a or path.startswith(a + "/") for a in allowed):
            continue
        if kind == "C" and any(a.startswith(path.rstrip("/") + "/") for a in allowed):
            continue  # a directory above an allowed one (its mtime)
        bad.append(line)
    return bad


def test_default_command_runs_as_uid_10001_and_writes_only_where_the_dockerfile_says(
    image: Image, podman: Podman
) -> None:
    (addr,) = loopback_addresses(1)
    name = podman.run_container(
        podman.name("default"),
        ["-p", f"{addr}:{GRPC_PORT}:{GRPC_PORT}", "-p", f"{addr}:{METRICS_PORT}:{METRICS_PORT}",
         image.image],
    )  # fmt: skip
    wait_until(
        lambda: http_get(f"http://{addr}:{METRICS_PORT}/readyz")[0] == 200, 120, "/readyz 200"
    )
    with client([f"{addr}:{GRPC_PORT}"]) as ps:
        ps.create_table("t", dim=4, optimizer="adagrad")
        keys = np.arange(100)
        rows = ps.pull("t", keys)
        ps.push("t", keys, np.ones_like(rows))
        assert not np.array_equal(ps.pull("t", keys, train=False), rows)
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
    assert uids and gids, status
    assert uids.group(1).split() == [str(UID)] * 4, uids.group(0)
    assert gids.group(1).split() == [str(UID)] * 4, gids.group(0)

    health = podman("healthcheck", "run", name, check=False)
    assert health.returncode == 0, f"HEALTHCHECK failed: {health.stdout}{health.stderr}"

    changes = podman("diff", name).stdout.splitlines()
    assert not _diff_outside(changes, WRITABLE + ENGINE_FILES), (
        f"the shard wrote outside {WRITABLE}: {_diff_outside(changes, WRITABLE + ENGINE_FILES)}"
    )
    podman.stop([name], STOP_GRACE_S)
    log = podman.logs(name)
    assert podman.exit_code(name) == 0, log
    assert "SIGTERM received, draining" in log and "exiting" in log, log


# --------------------------------------------------------------------------
# Two shards, the StatefulSet's way
# --------------------------------------------------------------------------


def _memory(q: str) -> str:
    """A Kubernetes memory quantity as podman's --memory (bytes)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", q)
    assert m and (m.group(2) in units or not m.group(2)), q
    return str(int(m.group(1)) * units.get(m.group(2), 1))


def _cpus(q: str) -> str:
    return str(int(q[:-1]) / 1000) if q.endswith("m") else q


def run_argv(plan: PodPlan, pod: dict[str, Any], mounts: dict[str, str], image: str) -> list[str]:
    """`podman run` flags for the plan's container, as the pod spec asks for it.

    mounts: for each volume name, the podman --volume source (host dir or volume);
    emptyDirs become a volume given in ``mounts`` too (disk-backed, like emptyDir).
    """
    c, spec = plan.container, pod["spec"]
    pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
    user = f"{sc.get('runAsUser', pod_sc['runAsUser'])}:{sc.get('runAsGroup', pod_sc['runAsGroup'])}"  # fmt: skip
    argv = ["--hostname", plan.name, "--user", user]
    if sc.get("readOnlyRootFilesystem"):
        argv += ["--read-only", "--read-only-tmpfs=false"]  # only the pod's volumes are writable
    for cap in sc.get("capabilities", {}).get("drop", []):
        argv += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    limits = c["resources"]["limits"]
    argv += ["--memory", _memory(limits["memory"]), "--cpus", _cpus(limits["cpu"])]
    for k, v in plan.env.items():
        argv += ["--env", f"{k}={v}"]
    for m in c["volumeMounts"]:
        ro = ":ro" if m.get("readOnly") else ""
        argv += ["--volume", f"{mounts[m['name']]}:{m['mountPath']}{ro}"]
    for p in c["ports"]:
        argv += ["-p", f"{plan.address}:{p['containerPort']}:{p['containerPort']}"]
    argv += ["--stop-timeout", str(int(plan.grace_s))]
    return [*argv, image, *c["args"]]


class Pair:
    """Two shard containers run from the dev overlay's pod template, and their client."""

    def __init__(self, podman: Podman, image: str, rendered: list[dict[str, Any]]) -> None:
        self.podman, self.image = podman, image
        self.plans = statefulset_pods(rendered, podman, "pair")
        assert len(self.plans) == 2, "the dev overlay runs 2 shards"
        root = podman.tmp / "pair"
        self.checkpoints = root / "checkpoints"  # one directory for both: ReadWriteMany
        self.checkpoints.mkdir(parents=True)
        os.chown(self.checkpoints, UID, UID)  # what fsGroup does for the pod's volume
        self.config = root / "config"
        self.config.mkdir()
        cm = next(d for d in self.plans[0].docs if d["kind"] == "ConfigMap")
        for fname, text in cm["data"].items():
            (self.config / fname).write_text(text, encoding="utf-8")
        self.round = 0

    def start(self) -> None:
        self.round += 1
        for plan in self.plans:
            pod = plan.docs[-1]
            mounts = {}
            for v in pod["spec"]["volumes"]:
                if "configMap" in v:
                    mounts[v["name"]] = str(self.config)
                elif "persistentVolumeClaim" in v:
                    mounts[v["name"]] = str(self.checkpoints)
                else:  # an emptyDir: a fresh volume per container
                    vol = self.podman.name(f"{plan.name}-{v['name']}-{self.round}")
                    self.podman.volumes.append(vol)
                    mounts[v["name"]] = vol
            plan.container_name = f"{plan.podman_name}-{self.round}"
            argv = run_argv(plan, pod, mounts, self.image)
            self.podman.run_container(plan.container_name, argv)
        wait_started(self.podman, self.plans)

    def stop(self) -> None:
        names = [p.container_name for p in self.plans]
        self.podman.stop(names, max(p.grace_s for p in self.plans))

    @property
    def addresses(self) -> list[str]:
        return [f"{p.address}:{p.port('grpc')}" for p in self.plans]


@pytest.fixture(scope="module")
def pair(image: Image, podman: Podman, rendered: dict[str, list[dict[str, Any]]]) -> Pair:
    return Pair(podman, image.image, rendered["dev"])


KEYS = np.arange(0, 400, 3)
STATE: dict[str, Any] = {}


def test_two_shards_started_like_the_statefulset_train_and_checkpoint(pair: Pair) -> None:
    pair.start()
    for plan in pair.plans:
        info = pair.podman.inspect(plan.container_name)
        assert info["Config"]["User"] == f"{UID}:{UID}"
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        for which in ("readinessProbe", "livenessProbe"):
            ok, detail = probe(plan, which)
            assert ok, f"{plan.name} {which}: {detail}"
    with client(pair.addresses) as ps:
        tables = {t.name for t in ps.describe_tables()}
        assert {"user_id", "item_id", "category", "user_item_cross"} <= tables  # the ConfigMap's
        ps.create_table("pair", dim=8, kind="dynamic", optimizer="adagrad")
        for table in ("pair", "category"):
            rows = ps.pull(table, KEYS)
            ps.push(table, KEYS, np.full_like(rows, 0.5))
        STATE["rows"] = {t: ps.pull(t, KEYS, train=False) for t in ("pair", "category")}
        results = ps.checkpoint(5)
    for r in results:
        assert r.path == f"/var/lib/embps/checkpoints/5/shard-{r.shard_id}-of-2", r
        on_host = pair.checkpoints / "5" / f"shard-{r.shard_id}-of-2"
        assert on_host.is_dir() and on_host.stat().st_uid == UID, on_host
    for plan in pair.plans:
        health = pair.podman("healthcheck", "run", plan.container_name, check=False)
        assert health.returncode == 0, f"{plan.name}: {health.stdout}{health.stderr}"


def test_two_shards_drain_on_stop_and_restore_their_rows(pair: Pair) -> None:
    assert STATE, "the previous test did not train"
    pair.stop()
    for plan in pair.plans:
        log = pair.podman.logs(plan.container_name)
        assert pair.podman.exit_code(plan.container_name) == 0, log
        assert "SIGTERM received, draining" in log, log
        # the exit checkpoint: the next step after the newest complete one
        assert f"written to /var/lib/embps/checkpoints/6/shard-{plan.ordinal}-of-2" in log, log
    pair.start()
    with client(pair.addresses) as ps:
        for table, rows in STATE["rows"].items():
            np.testing.assert_array_equal(ps.pull(table, KEYS, train=False), rows, table)
    for plan in pair.plans:
        assert "restored" in pair.podman.logs(plan.container_name).lower()


def test_checkpoint_files_belong_to_the_shard_user(pair: Pair) -> None:
    for path in Path(pair.checkpoints).rglob("*"):
        assert path.stat().st_uid == UID, path
