"""Generate the Python messages, gRPC stubs and type stubs of the v1 contract.

    python proto/generate.py            # rewrite the committed files next to the .proto files
    python proto/generate.py --out DIR  # write them under DIR instead (the freshness test)

The .proto tree mirrors the Python package path (proto/pagedserve/v1/x.proto), so protoc writes
package-qualified imports (`from pagedserve.v1 import common_pb2`) with no post-processing.
The generated files are committed; tests/test_proto.py regenerates them and fails when they are
stale. grpcio-tools is pinned exactly in pyproject.toml so that regeneration is byte-stable.
"""

import argparse
import pathlib
import sys

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent


def proto_files() -> list[pathlib.Path]:
    return sorted((PROTO_ROOT / "pagedserve" / "v1").glob("*.proto"))


def generate(out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed (see the message above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=PROTO_ROOT,
                        help="output root (default: next to the .proto files)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
