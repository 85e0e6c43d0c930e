"""A client built only from the published TGIS proto, run as its own process.

The published proto and ours both define the protobuf package ``fmaas``, so
they cannot share one process's descriptor pool; tests run this script in a
subprocess and talk JSON to it. It compiles the published
``generation.proto`` (fetched by ``make install`` into ``.cache/tgis/``) into
a private directory and calls the server with those stubs only.

Usage: python tgis_client.py HOST:PORT < calls.json > results.json
where calls.json is a list of {"method": "Generate" | "GenerateStream" |
"Tokenize" | "ModelInfo", "request": {...protobuf JSON...}}. Each result is
{"ok": true, "response": ... (a list of messages for GenerateStream)} or
{"ok": false, "code": "INVALID_ARGUMENT", "details": "..."}.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PUBLISHED_PROTO = REPO / ".cache" / "tgis" / "generation.proto"

REQUEST_TYPES = {
    "Generate": "BatchedGenerationRequest",
    "GenerateStream": "SingleGenerationRequest",
    "Tokenize": "BatchedTokenizeRequest",
    "ModelInfo": "ModelInfoRequest",
}


def load_stubs():
    if not PUBLISHED_PROTO.exists():
        raise SystemExit(f"{PUBLISHED_PROTO} is missing; run `make install`")
    from grpc_tools import protoc

    out = Path(tempfile.mkdtemp(prefix="tgis-stubs-"))
    shutil.copy(PUBLISHED_PROTO, out / "generation.proto")
    rc = protoc.main(
        ["protoc", f"-I{out}", f"--python_out={out}", f"--grpc_python_out={out}", str(out / "generation.proto")]
    )
    if rc != 0:
        raise SystemExit("protoc failed on the published TGIS proto")
    sys.path.insert(0, str(out))
    return importlib.import_module("generation_pb2"), importlib.import_module("generation_pb2_grpc")


def main() -> None:
    import grpc
    from google.protobuf import json_format

    pb2, pb2_grpc = load_stubs()
    calls = json.load(sys.stdin)
    channel = grpc.insecure_channel(sys.argv[1])
    stub = pb2_grpc.GenerationServiceStub(channel)
    results = []
    for call in calls:
        method = call["method"]
        request = json_format.ParseDict(call.get("request", {}), getattr(pb2, REQUEST_TYPES[method])())
        try:
            answer = getattr(stub, method)(request, timeout=call.get("timeout", 120))
            if method == "GenerateStream":
                response = [json_format.MessageToDict(m) for m in answer]
            else:
                response = json_format.MessageToDict(answer)
            results.append({"ok": True, "response": response})
        except grpc.RpcError as err:
            results.append({"ok": False, "code": err.code().name, "details": err.details()})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
