"""Regenerate the Python code for ``rnnzoo/v1/rnnzoo.proto`` into ``proto/v1/``.

    python -m rnnzoo.proto.generate            # rewrite proto/v1/rnnzoo_pb2*.py(i)
    python -m rnnzoo.proto.generate --out DIR  # write them into DIR instead (staleness test)

Needs ``grpcio-tools`` (the ``dev`` extra, pinned so the output is byte-for-byte stable).
protoc writes the grpc module with an absolute ``from rnnzoo.v1 import rnnzoo_pb2``, which
would name a package that does not exist here; it is rewritten to a relative import.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rnnzoo.errors import FailedPrecondition

HERE = Path(__file__).resolve().parent
PROTO = Path("rnnzoo/v1/rnnzoo.proto")  # relative to HERE: protoc names modules after it
OUTPUTS = ("rnnzoo_pb2.py", "rnnzoo_pb2.pyi", "rnnzoo_pb2_grpc.py")
ABSOLUTE_IMPORT = "from rnnzoo.v1 import rnnzoo_pb2 as"
RELATIVE_IMPORT = "from . import rnnzoo_pb2 as"


def generate(out_dir: str | Path) -> list[Path]:
    """Run protoc on the source and write the three modules into ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ModuleNotFoundError:
        raise FailedPrecondition(
            "regenerating the protocol code needs grpcio-tools: pip install 'rnnzoo[dev]'"
        ) from None
    import importlib.resources

    include = importlib.resources.files("grpc_tools") / "_proto"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO),
        ]
        if protoc.main(args) != 0:
            raise FailedPrecondition(f"protoc failed on {HERE / PROTO}; see its message above")
        written = []
        for name in OUTPUTS:
            text = (Path(tmp) / PROTO.parent / name).read_text(encoding="utf-8")
            if name.endswith("_grpc.py"):
                assert ABSOLUTE_IMPORT in text, "protoc changed its import style"
                text = text.replace(ABSOLUTE_IMPORT, RELATIVE_IMPORT)
            (out / name).write_text(text, encoding="utf-8")
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "v1"), help="output folder (default: v1/)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
