"""Write the development constraints file from a virtualenv's installed packages.

Usage: python requirements/write_constraints.py VENV_PYTHON OUT

Runs ``VENV_PYTHON -m pip freeze --all`` and writes exact ``name==version`` pins
(pip, setuptools and wheel included; embps itself and editable installs left
out; a local version label such as torch's ``+cpu`` dropped, so the pin matches
the build the Makefile's TORCH_SPEC installs). No index URLs or hosts are
written. `make upgrade-deps` calls it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEADER = """\
# Exact versions of everything `make venv` installs for development and tests.
# pyproject.toml keeps ranges for users; this file pins the toolchain so a patch
# release of a tool cannot change a fresh clone's `make test`. Regenerate with
# `make upgrade-deps` (newest versions within pyproject's ranges, then protos and tests).
# No index URLs or hosts here on purpose.
"""


def pins(freeze: str) -> list[str]:
    """``name==version`` lines of a ``pip freeze`` output, sorted by name (case-insensitive)."""
    out = []
    for line in freeze.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue
        name, version = line.split("==", 1)
        if name.lower() == "embps":
            continue
        out.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(out, key=str.lower)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    freeze = subprocess.run(
        [argv[1], "-m", "pip", "freeze", "--all"], check=True, capture_output=True, text=True
    ).stdout
    Path(argv[2]).write_text(HEADER + "\n".join(pins(freeze)) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
