"""The committed generated code is what `make protos` generates from embps.proto, and
the development toolchain that generates it is pinned.

The comparison leaves out the lines where the generators write their own version
(``GRPC_GENERATED_VERSION``, ``Protobuf Python Version`` and the runtime check's
numbers), so an edit of the .proto without regenerating fails while a patch release of
grpcio-tools does not. Those versions are checked apart: the runtime that pyproject.toml
allows users must satisfy them.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
GENERATED = ("embps_pb2.py", "embps_pb2.pyi", "embps_pb2_grpc.py")
CONSTRAINTS = ROOT / "requirements" / "constraints-dev.txt"

_VERSION_LINES = (
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = <v>"),
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: <v>"),
    (
        re.compile(
            r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)"
            r"\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"
        ),
        r"\1 <v>,",
    ),
)


def normalise(code: str) -> str:
    """Generated code without the generator's own version stamps."""
    for pattern, repl in _VERSION_LINES:
        code = pattern.sub(repl, code)
    return code


def generate(proto_root: Path, out: Path) -> dict[str, str]:
    """Run the Makefile's `protos` command on ``proto_root`` into ``out``; name -> code."""
    pytest.importorskip("grpc_tools")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(proto_root),
           f"--python_out={out}", f"--grpc_python_out={out}", f"--pyi_out={out}",
           str(proto_root / "embps/v1/embps.proto")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {name: (out / "embps" / "v1" / name).read_text() for name in GENERATED}


def committed() -> dict[str, str]:
    return {name: (ROOT / "protos" / "embps" / "v1" / name).read_text() for name in GENERATED}


def stale(fresh: dict[str, str], have: dict[str, str]) -> list[str]:
    """Names whose committed code differs from the fresh code beyond version stamps."""
    return [n for n in GENERATED if normalise(fresh[n]) != normalise(have[n])]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    bad = stale(generate(ROOT / "protos", tmp_path), committed())
    assert not bad, f"protos/embps/v1/{bad} stale: run `make protos`"


def test_an_edited_proto_without_regenerating_is_caught(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "embps" / "v1").mkdir(parents=True)
    proto = (ROOT / "protos" / "embps" / "v1" / "embps.proto").read_text()
    edited = proto.replace("message StatsRequest {", "message StatsRequest {\n  bool verbose = 99;")
    assert edited != proto
    (src / "embps" / "v1" / "embps.proto").write_text(edited)
    out = tmp_path / "out"
    out.mkdir()
    assert stale(generate(src, out), committed()) == list(GENERATED[:2])  # pb2 and its .pyi


def test_a_tool_patch_release_is_not_staleness() -> None:
    have = committed()
    bumped = {
        n: re.sub(
            r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '1.85.99'", c
        ).replace("# Protobuf Python Version: ", "# Protobuf Python Version: 9")
        for n, c in have.items()
    }
    bumped["embps_pb2.py"] = re.sub(
        r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+", r"\g<1>7, 99, 3", bumped["embps_pb2.py"]
    )
    assert bumped != have  # the stamps really moved
    assert stale(bumped, have) == []


def _generated_versions() -> tuple[tuple[int, ...], tuple[int, ...]]:
    have = committed()
    grpc_v = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", have["embps_pb2_grpc.py"])
    pb_v = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)", have["embps_pb2.py"])
    assert grpc_v and pb_v
    return tuple(int(x) for x in grpc_v.group(1).split(".")), tuple(int(x) for x in pb_v.groups())


def _lower_bound(requirement: str) -> tuple[int, ...]:
    m = re.search(r">=\s*([\d.]+)", requirement)
    assert m, f"{requirement!r} has no lower bound"
    return tuple(int(x) for x in m.group(1).split("."))


def test_pyproject_floors_satisfy_the_generated_code() -> None:
    """A user who installs the lowest grpcio/protobuf pyproject allows can import embps."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    by_name = {re.split(r"[<>=!~ ;]", d, maxsplit=1)[0]: d for d in deps}
    grpc_v, pb_v = _generated_versions()
    assert _lower_bound(by_name["grpcio"]) >= grpc_v, (by_name["grpcio"], grpc_v)
    assert _lower_bound(by_name["protobuf"]) >= pb_v, (by_name["protobuf"], pb_v)
    assert f"<{pb_v[0] + 1}" in by_name["protobuf"]  # the generated code's major only


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.\-]*", line), (
            f"not an exact pin: {line!r}"
        )
        name, version = line.split("==")
        pins[name.lower().replace("_", "-")] = version
    return pins


def test_constraints_pin_every_development_dependency_exactly() -> None:
    text = CONSTRAINTS.read_text()
    assert "://" not in text and "--" not in text  # no index URLs, hosts or pip options
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("dev", "torch", "demo"):
        reqs += project["optional-dependencies"][extra]
    pins = _pins()
    for req in reqs:
        name = re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} (pyproject.toml) has no pin in {CONSTRAINTS.name}"
    assert {"pip", "setuptools", "wheel"} <= pins.keys()


def test_the_venv_runs_the_pinned_toolchain() -> None:
    """`make venv` installed exactly the pins (the tools that write and check code)."""
    pins = _pins()
    for name in ("grpcio-tools", "grpcio", "protobuf", "ruff", "mypy", "pytest", "numba", "numpy"):
        installed = importlib.metadata.version(name).split("+", 1)[0]
        assert installed == pins[name], f"{name} {installed} installed, {pins[name]} pinned"


def test_makefile_uses_the_same_flags_and_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for flag in ("-I protos", "--python_out=protos", "--grpc_python_out=protos",
                 "--pyi_out=protos", "protos/embps/v1/embps.proto"):  # fmt: skip
        assert flag in makefile, f"Makefile protos target lacks {flag}"
    assert "CONSTRAINTS := requirements/constraints-dev.txt" in makefile
    assert "$(STAMP): pyproject.toml $(CONSTRAINTS)" in makefile  # a new pin reinstalls
    assert "upgrade-deps:" in makefile


def test_write_constraints_pins_exactly_without_local_labels() -> None:
    sys.path.insert(0, str(ROOT / "requirements"))
    try:
        import write_constraints
    finally:
        sys.path.pop(0)
    freeze = "torch==2.13.0+cpu\n-e git+x#egg=embps\nembps==0.1.0\nNumpy==2.4.6\n# c\npip==26.3\n"
    assert write_constraints.pins(freeze) == ["Numpy==2.4.6", "pip==26.3", "torch==2.13.0"]


def test_generated_imports_need_no_rewriting() -> None:
    grpc_code = (ROOT / "protos" / "embps" / "v1" / "embps_pb2_grpc.py").read_text()
    assert "from embps.v1 import embps_pb2" in grpc_code
    from embps.v1 import embps_pb2, embps_pb2_grpc  # the installed import path works

    assert embps_pb2_grpc.ParameterServerStub is not None
    assert embps_pb2.DESCRIPTOR.package == "embps.v1"
