"""Regenerate the Python code of the wire contract (proto/spotserve/v1/*.proto).

    python scripts/gen_proto.py           # rewrite *_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python scripts/gen_proto.py --check   # exit 1 if the committed code is stale

Needs grpcio-tools (the dev extra). The generated modules import each other as
`spotserve.v1.*`, which the package-dir mapping resolves to proto/spotserve/v1.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = PROTO_ROOT / "spotserve" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    sources = sorted(PACKAGE.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, sources)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return [out / "spotserve" / "v1" / f"{src.stem}{suffix}"
            for src in sources for suffix in SUFFIXES]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed files instead of writing them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for produced in generate(Path(tmp)):
            target = PACKAGE / produced.name
            if args.check:
                if not target.exists() or not filecmp.cmp(produced, target, shallow=False):
                    stale.append(target.name)
            else:
                shutil.copyfile(produced, target)
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run python scripts/gen_proto.py")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
