"""Regenerate the Python code of the protocols rnnzoo speaks.

    python -m rnnzoo.proto.generate            # rewrite both generated trees
    python -m rnnzoo.proto.generate --out DIR  # write them under DIR instead (staleness test):
                                               # DIR/v1/ and DIR/inference/v2/

- ``rnnzoo/v1/rnnzoo.proto`` (package ``rnnzoo.v1``) -> ``proto/v1/``;
- Triton's ``grpc_service.proto`` + ``model_config.proto`` (package ``inference``, the KServe
  v2 / Open Inference Protocol with Triton's extensions; BSD-3-Clause, kept verbatim with
  their licence headers, upstream commit in ``inference/v2/UPSTREAM``) -> ``proto/inference/v2/``
  beside their sources.

Needs ``grpcio-tools`` (the ``dev`` extra, pinned so the output is byte-for-byte stable).
protoc writes absolute imports (``from rnnzoo.v1 import rnnzoo_pb2``, ``import
model_config_pb2``) naming packages that do not exist here; they are rewritten to relative ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rnnzoo.errors import FailedPrecondition

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Target:
    root: str  # the -I folder, relative to HERE: protoc names modules after paths under it
    protos: tuple[str, ...]  # relative to root
    out: str  # output folder relative to HERE
    outputs: tuple[str, ...]  # the modules kept, relative to root
    rewrites: tuple[tuple[str, str], ...]  # a line's absolute import -> relative import

    def written(self, name: str) -> str:
        return Path(name).name


RNNZOO = Target(
    root=".",
    protos=("rnnzoo/v1/rnnzoo.proto",),
    out="v1",
    outputs=("rnnzoo/v1/rnnzoo_pb2.py", "rnnzoo/v1/rnnzoo_pb2.pyi", "rnnzoo/v1/rnnzoo_pb2_grpc.py"),
    rewrites=(("from rnnzoo.v1 import rnnzoo_pb2 as", "from . import rnnzoo_pb2 as"),),
)
INFERENCE = Target(
    root="inference/v2",
    protos=("grpc_service.proto", "model_config.proto"),
    out="inference/v2",
    outputs=(
        "model_config_pb2.py",
        "model_config_pb2.pyi",
        "grpc_service_pb2.py",
        "grpc_service_pb2.pyi",
        "grpc_service_pb2_grpc.py",
    ),
    rewrites=(
        ("import model_config_pb2 as", "from . import model_config_pb2 as"),
        ("import grpc_service_pb2 as", "from . import grpc_service_pb2 as"),
    ),
)
TARGETS = (RNNZOO, INFERENCE)
# rnnzoo.v1's modules, by their written names (kept for callers of ``generate``)
OUTPUTS = tuple(Path(n).name for n in RNNZOO.outputs)


def _run(target: Target, out: Path) -> list[Path]:
    try:
        from grpc_tools import protoc
    except ModuleNotFoundError:
        raise FailedPrecondition(
            "regenerating the protocol code needs grpcio-tools: pip install 'rnnzoo[dev]'"
        ) from None
    import importlib.resources

    include = importlib.resources.files("grpc_tools") / "_proto"
    root = HERE / target.root
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *target.protos,
        ]
        if protoc.main(args) != 0:
            raise FailedPrecondition(f"protoc failed on {target.protos}; see its message above")
        written = []
        for name in target.outputs:
            text = (Path(tmp) / name).read_text(encoding="utf-8")
            lines = text.splitlines(keepends=True)
            for i, line in enumerate(lines):
                for absolute, relative in target.rewrites:
                    if line.startswith(absolute):
                        lines[i] = relative + line.removeprefix(absolute)
            text = "".join(lines)
            path = out / target.written(name)
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def generate(out_dir: str | Path) -> list[Path]:
    """rnnzoo.v1: run protoc on the source and write its three modules into ``out_dir``."""
    return _run(RNNZOO, Path(out_dir))


def generate_inference(out_dir: str | Path) -> list[Path]:
    """inference (KServe v2 / Triton): write its five modules into ``out_dir``."""
    return _run(INFERENCE, Path(out_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE), help="output root (default: proto/)")
    args = parser.parse_args(argv)
    for target in TARGETS:
        for path in _run(target, Path(args.out) / target.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
