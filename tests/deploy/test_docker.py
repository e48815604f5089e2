"""The Dockerfile: lint, pinned multi-stage build, non-root runtime, default command, HEALTHCHECK.

These checks need no container engine (test_image.py and test_kube_play.py
build the image and run it): hadolint; the builder stage's COPY lines, applied
to the repository through .dockerignore, give a source tree that builds a
wheel with every module; the default command parses with the real `embps
serve` parser; the HEALTHCHECK command runs against a real shard's gRPC health
service.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from .artifacts import (
    DOCKERFILE,
    ROOT,
    dockerfile_instructions,
    exec_form,
    require,
    run,
)
from .containers import build_module

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
INSTRUCTIONS = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
HEALTHCHECK_TIMEOUT_S = 30


def instructions(word: str) -> list[str]:
    return [args for w, args in INSTRUCTIONS if w == word]


def stages() -> list[list[tuple[str, str]]]:
    """Instructions split by FROM (index 0: the global ARGs before the first FROM)."""
    out: list[list[tuple[str, str]]] = [[]]
    for w, args in INSTRUCTIONS:
        if w == "FROM":
            out.append([])
        out[-1].append((w, args))
    return out


def last(word: str) -> str:
    found = instructions(word)
    assert found, f"the Dockerfile has no {word}"
    return found[-1]


# --------------------------------------------------------------------------
# Lint and structure
# --------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    hadolint = require("hadolint")
    res = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_base_image_is_pinned_python_311_slim_by_digest() -> None:
    args = dict(a.split("=", 1) for w, a in stages()[0] if w == "ARG" and "=" in a)
    froms = instructions("FROM")
    assert len(froms) >= 2, "multi-stage: a builder stage and a runtime stage"
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?@sha256:[0-9a-f]{64}", image), image


def test_runtime_stage_copies_the_venv_and_runs_as_a_numeric_non_root_user() -> None:
    builder, runtime = stages()[1], stages()[-1]
    assert builder[0][1].split()[-2:] == ["AS", "builder"]
    copies = [a for w, a in runtime if w == "COPY"]
    assert any(a.startswith("--from=builder /opt/venv") for a in copies), copies
    user = [a for w, a in runtime if w == "USER"]
    assert user, "the runtime stage sets no USER"
    uid = user[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {user[-1]}: Kubernetes' runAsNonRoot needs a uid"


def test_environment_and_ports() -> None:
    env = dict(kv.split("=", 1) for w, a in stages()[-1] if w == "ENV" for kv in a.split())
    assert "/opt/venv/bin" in env["PATH"].split(":")
    numba_cache = env["NUMBA_CACHE_DIR"]
    runs = " ".join(a for w, a in stages()[-1] if w == "RUN")
    assert numba_cache in runs, "NUMBA_CACHE_DIR must be created (and owned by the user)"
    exposed = {int(p.split("/")[0]) for a in instructions("EXPOSE") for p in a.split()}
    cmd = exec_form(last("CMD"))
    port = int(cmd[cmd.index("--port") + 1])
    metrics_port = int(cmd[cmd.index("--metrics-port") + 1])
    assert {port, metrics_port} <= exposed
    assert env["EMBPS_PORT"] == str(port), "embps health checks EMBPS_PORT: keep it = --port"
    assert env["EMBPS_METRICS_PORT"] == str(metrics_port), (
        "HEALTHCHECK probes EMBPS_METRICS_PORT: keep it = --metrics-port"
    )


def test_entrypoint_is_the_console_script() -> None:
    entrypoint = exec_form(last("ENTRYPOINT"))
    assert entrypoint == ["embps"]
    assert "embps" in PYPROJECT["project"]["scripts"]


def test_default_command_starts_one_shard_on_all_interfaces() -> None:
    from embps.client.cli import build_parser
    from embps.server.serve import resolve_options, shard_config

    argv = exec_form(last("CMD"))
    assert argv[0] == "serve"
    args = build_parser(argv).parse_args(argv)
    opts, tables = resolve_options(args)
    cfg = shard_config(opts, tables, args.shard_id)
    assert (cfg.shard_id, cfg.num_shards, cfg.host) == (0, 1, "0.0.0.0")


# --------------------------------------------------------------------------
# The build context and the builder stage
# --------------------------------------------------------------------------


# The .dockerignore matcher is build.py's: the same rules pick what `make image` hashes.
dockerignored = build_module().dockerignored
dockerignore_rules = build_module().dockerignore_rules


def test_dockerignore_keeps_caches_and_the_venv_out() -> None:
    rules = dockerignore_rules()
    kept_out = [".venv/bin/python", ".git/HEAD", "server/__pycache__/x.nbi", "tests/x.py"]
    kept_out += ["server/hashmap.cpython-311.pyc", "bench-results/engine.json"]
    for path in kept_out:
        assert dockerignored(path, rules), f"{path} would be sent to the Docker daemon"
    assert not dockerignored("server/service/server.py", rules)


def test_builder_stage_sources_build_a_complete_wheel(tmp_path: Path) -> None:
    """Apply the builder's COPY lines to the repository (through .dockerignore), build the wheel."""
    rules = dockerignore_rules()
    builder = stages()[1]
    workdir = Path("/")
    src = tmp_path / "root"
    for word, args in builder:
        if word == "WORKDIR":
            workdir = workdir / args
        elif word == "COPY":
            *sources, dest = args.split()
            assert not any(s.startswith("--") for s in sources), args
            target = src / (workdir / dest).relative_to("/")
            for s in sources:
                origin = ROOT / s
                assert origin.exists(), f"COPY {s}: no such path in the build context"
                assert not dockerignored(s.rstrip("/"), rules), f"COPY {s}: .dockerignore drops it"
                files = [origin] if origin.is_file() else sorted(origin.rglob("*"))
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    if f.is_dir() or dockerignored(rel, rules):
                        continue
                    inner = f.relative_to(origin) if origin.is_dir() else Path(f.name)
                    out = target / inner if dest.endswith("/") or origin.is_dir() else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
    build_dir = src / (workdir.relative_to("/"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    res = run([*pip_wheel, "-w", str(tmp_path / "dist"), str(build_dir)], timeout=120)
    assert res.returncode == 0, f"the builder's `pip install .` would fail:\n{res.stderr}"
    (wheel,) = (tmp_path / "dist").glob("embps-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package_dirs = PYPROJECT["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dirs.items():
        for module in sorted((ROOT / folder).glob("*.py")):
            wanted = package.replace(".", "/") + "/" + module.name
            assert wanted in names, f"{wanted} is missing from the image's wheel"
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    )
    assert b"embps = embps.client.cli:main" in entry_points


# --------------------------------------------------------------------------
# HEALTHCHECK
# --------------------------------------------------------------------------


def healthcheck_argv() -> list[str]:
    """The HEALTHCHECK's exec-form command (`embps health`, run from this interpreter's bin/)."""
    args = last("HEALTHCHECK")
    options, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    assert "--timeout=" in options and "--start-period=" in options, options
    argv = exec_form(command.strip())
    assert "embps health" in " ".join(argv), argv
    return argv


def run_healthcheck(metrics_port: int) -> subprocess.CompletedProcess:
    """The HEALTHCHECK command, through /bin/sh as Docker runs it, with the image's
    EMBPS_METRICS_PORT set to ``metrics_port``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBPS_")}
    env["EMBPS_METRICS_PORT"] = str(metrics_port)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(
        healthcheck_argv(), env=env, capture_output=True, text=True, timeout=HEALTHCHECK_TIMEOUT_S
    )


def _serve(**options: object):
    from embps.server.service import ShardConfig, build_server

    s = build_server(ShardConfig(port=0, host="127.0.0.1", metrics_port=0, **options))  # type: ignore[arg-type]
    s.start()
    yield s
    s.stop(grace=0)


@pytest.fixture(scope="module")
def shard():
    yield from _serve()


@pytest.fixture(scope="module")
def tls_shard(tmp_path_factory):
    from support.certs import make_certs

    certs = make_certs(tmp_path_factory.mktemp("certs"))
    yield from _serve(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca)


def test_healthcheck_passes_on_a_serving_shard(shard) -> None:
    res = run_healthcheck(shard.metrics_port)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("/readyz: SERVING"), res.stdout


def test_healthcheck_passes_on_a_mutual_tls_shard(tls_shard) -> None:
    """The gRPC port refuses plaintext; the HEALTHCHECK reads /readyz and needs no cert."""
    res = run_healthcheck(tls_shard.metrics_port)
    assert res.returncode == 0, res.stderr


def test_healthcheck_fails_on_a_draining_shard(shard) -> None:
    from grpc_health.v1 import health_pb2

    shard.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        res = run_healthcheck(shard.metrics_port)
    finally:
        shard.health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "NOT_SERVING" in res.stdout, res.stdout


def test_healthcheck_fails_on_a_closed_port() -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        res = run_healthcheck(s.getsockname()[1])
    assert res.returncode == 1, "every failure maps to 1 (Docker reserves 2)"
    assert "unreachable" in res.stderr and "ConnectionRefusedError" in res.stderr, res.stderr
