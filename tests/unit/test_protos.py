"""The committed generated code is exactly what `make protos` generates from embps.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("embps_pb2.py", "embps_pb2.pyi", "embps_pb2_grpc.py")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    # the same flags as the Makefile's `protos` target, into a scratch directory
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos",
           f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
           "protos/embps/v1/embps.proto"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in GENERATED:
        fresh = (tmp_path / "embps" / "v1" / name).read_bytes()
        committed = (ROOT / "protos" / "embps" / "v1" / name).read_bytes()
        assert fresh == committed, f"protos/embps/v1/{name} is stale: run `make protos`"


def test_makefile_uses_the_same_flags() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for flag in ("-I protos", "--python_out=protos", "--grpc_python_out=protos",
                 "--pyi_out=protos", "protos/embps/v1/embps.proto"):  # fmt: skip
        assert flag in makefile, f"Makefile protos target lacks {flag}"


def test_generated_imports_need_no_rewriting() -> None:
    grpc_code = (ROOT / "protos" / "embps" / "v1" / "embps_pb2_grpc.py").read_text()
    assert "from embps.v1 import embps_pb2" in grpc_code
    from embps.v1 import embps_pb2, embps_pb2_grpc  # the installed import path works

    assert embps_pb2_grpc.ParameterServerStub is not None
    assert embps_pb2.DESCRIPTOR.package == "embps.v1"
