"""Generate the Python gRPC code in proto/meterlink/v1 from the .proto files (grpcio-tools).

Run: python scripts/gen_proto.py [--out DIR]. tests/test_proto_generated.py fails when the
committed generated code differs from what this script produces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "meterlink" / "v1").glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", f"--pyi_out={out}", *protos])
    if rc != 0:
        raise SystemExit(f"protoc failed with status {rc}")
    return sorted((out / "meterlink" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: proto/)")
    args = ap.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
