"""The examples' job types, compiled from examples/proto on first import, as a project's build
step compiles its own .proto files (protoc with ``jobwire.proto_include()`` on the include path
when they use the ``(jobwire.v1.job)`` option). The messages are those of the Rust SDK's
examples, so these examples and the Rust ones serve and enqueue each other's jobs.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = HERE / "_generated"
SOURCE = HERE / "proto" / "jobwire_examples.proto"


def _compile() -> None:
    target = GENERATED / "jobwire_examples_pb2.py"
    if target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return
    from grpc_tools import protoc

    GENERATED.mkdir(exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{SOURCE.parent}", f"--python_out={GENERATED}", str(SOURCE)]
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    if plugin.exists():
        # Type stubs too, where mypy-protobuf is installed (the SDK's test extra has it).
        args[1:1] = [f"--mypy_out={GENERATED}", f"--plugin=protoc-gen-mypy={plugin}"]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {SOURCE}")


_compile()
sys.path.insert(0, str(GENERATED))

from jobwire_examples_pb2 import (  # noqa: E402
    Countdown,
    CountdownCheckpoint,
    CountdownOutput,
    Resize,
    ResizeOutput,
)

import jobwire  # noqa: E402

RESIZE = jobwire.JobType("image.resize", Resize, ResizeOutput)
COUNTDOWN = jobwire.JobType("demo.countdown", Countdown, CountdownOutput)

__all__ = [
    "COUNTDOWN",
    "RESIZE",
    "Countdown",
    "CountdownCheckpoint",
    "CountdownOutput",
    "Resize",
    "ResizeOutput",
]
