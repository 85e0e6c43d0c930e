"""Generate the Python gRPC stubs for every .proto under proto/.

Run by `make proto` and by the package build (setup.py). The stubs land in
`server/text_generation_server/pb/` as a package tree mirroring the proto
packages (`pb/fmaas/`, `pb/generate/v1/`); generated files are never
committed or edited by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "server" / "text_generation_server" / "pb"
PB_PACKAGE = "text_generation_server.pb"


def build(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + ", ".join(map(str, protos)))

    # protoc writes absolute imports (`from fmaas import generation_pb2`);
    # rewrite them to live under our package.
    generated = sorted(out_dir.rglob("*_pb2*.py"))
    for path in generated:
        text = path.read_text()
        fixed = re.sub(
            r"^from ((?:fmaas|generate)(?:\.\w+)*) import (\w+_pb2)",
            rf"from {PB_PACKAGE}.\1 import \2",
            text,
            flags=re.M,
        )
        if fixed != text:
            path.write_text(fixed)
    for d in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        if d.name != "__pycache__":
            (d / "__init__.py").touch()
    return generated


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for p in build(out):
        print(p.relative_to(out))
