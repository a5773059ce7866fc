"""Compiles the tests' job types (tests/proto, and the examples' examples/proto) into
tests/_generated, as a project using the SDK compiles its own: protoc with the SDK's
``jobwire/v1/options.proto`` on the include path. Run by conftest.py, and by scripts/test-python
before mypy so the tests type-check against the stubs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

import jobwire

HERE = Path(__file__).resolve().parent
GENERATED = HERE / "_generated"
SOURCES = [HERE / "proto", HERE.parent / "examples" / "proto"]


def generate() -> Path:
    shutil.rmtree(GENERATED, ignore_errors=True)
    GENERATED.mkdir()
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    files = [str(p) for root in SOURCES for p in sorted(root.glob("*.proto"))]
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        *(f"-I{root}" for root in SOURCES),
        f"-I{jobwire.proto_include()}",
        f"-I{well_known}",
        f"--python_out={GENERATED}",
        f"--mypy_out={GENERATED}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    return GENERATED


if __name__ == "__main__":
    print(generate())
