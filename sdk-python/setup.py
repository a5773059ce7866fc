"""Build hook: compiles the protocol in ``../proto`` into ``jobwire.v1`` at every build.

The stubs are generated, never committed, so they cannot go stale: a build from the checkout
always reflects ``proto/`` as it is. ``grpc_tools.protoc`` writes the messages and gRPC stubs,
``mypy-protobuf`` the ``.pyi`` files that type them. The ``.proto`` sources are copied beside
them (``jobwire/_protos``) so that projects compiling their own job types can import
``jobwire/v1/options.proto`` (see ``jobwire.proto_include``).

A source distribution carries a copy of ``proto/`` (made by ``sdist`` below), so it builds
away from the checkout too. The runtime requirements pin grpcio and protobuf to at least the
versions the stubs came from, because generated code refuses older runtimes.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "src" / "jobwire"
GENERATED = PACKAGE / "v1"
PROTOS_COPY = PACKAGE / "_protos"


def proto_root() -> Path:
    """The checkout's ``proto/`` or, in an unpacked sdist, its copy."""
    for candidate in (HERE.parent / "proto", HERE / "proto"):
        if (candidate / "jobwire" / "v1").is_dir():
            return candidate
    raise SystemExit(
        "jobwire: no proto/jobwire/v1 beside sdk-python/ (build from the repository checkout)"
    )


class GenerateStubs(Command):
    description = "compile proto/jobwire/v1/*.proto into jobwire.v1"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        from grpc_tools import protoc

        root = proto_root()
        sources = sorted(str(p.relative_to(root)) for p in (root / "jobwire" / "v1").glob("*.proto"))
        well_known = Path(protoc.__file__).resolve().parent / "_proto"
        out = PACKAGE.parent
        shutil.rmtree(GENERATED, ignore_errors=True)
        shutil.rmtree(PROTOS_COPY, ignore_errors=True)
        plugins = Path(tempfile.mkdtemp(prefix="jobwire-protoc-plugins-"))
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            f"--plugin=protoc-gen-mypy={_plugin(plugins, 'main')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin(plugins, 'grpc')}",
            *sources,
        ]
        try:
            if protoc.main(args) != 0:
                raise SystemExit("jobwire: protoc failed on " + ", ".join(sources))
        finally:
            shutil.rmtree(plugins, ignore_errors=True)
        (GENERATED / "__init__.py").write_text(
            '"""Generated from proto/jobwire/v1 at build time; do not edit."""\n'
        )
        for source in sources:
            target = PROTOS_COPY / source
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / source, target)


def _plugin(directory: Path, entry: str) -> Path:
    """An executable running a mypy-protobuf entry point with this interpreter. Its console
    scripts live in the build environment's own bin directory, which is not beside
    ``sys.executable`` in an isolated build, whereas this interpreter (and its environment,
    which children inherit) always reaches the module."""
    script = directory / f"protoc-gen-{entry}"
    script.write_text(
        f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
        f"'import sys; from mypy_protobuf.main import {entry}; sys.exit({entry}())'\n"
    )
    script.chmod(0o755)
    return script


class BuildPy(build_py):
    def run(self) -> None:
        self.run_command("generate_stubs")
        # Generated modules appeared after setuptools listed the packages: list them again.
        self.packages = sorted({*(self.packages or []), "jobwire.v1"})
        self.data_files = self._get_data_files()
        super().run()


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        shutil.copytree(proto_root(), Path(base_dir) / "proto", dirs_exist_ok=True)


def runtime_requirements() -> list[str]:
    """grpcio and protobuf at least as new as those of the build, whose protoc wrote the stubs."""
    protobuf_version = version("protobuf")
    major = int(protobuf_version.split(".")[0])
    return [
        f"grpcio>={version('grpcio-tools')}",
        f"protobuf>={protobuf_version},<{major + 1}",
        "googleapis-common-protos>=1.56",
    ]


setup(
    cmdclass={"generate_stubs": GenerateStubs, "build_py": BuildPy, "sdist": Sdist},
    install_requires=runtime_requirements(),
)
