"""Wire compatibility: a client generated only from the published TGIS proto talks to the router.

The published proto and ours both define protobuf package ``fmaas``, so the
client runs in its own process (tests/e2e/tgis_client.py compiles the
published proto into a private directory and speaks JSON on stdin/stdout).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fake_shard import FakeModel, RouterHarness, make_tokenizer_dir
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "tests" / "e2e" / "tgis_client.py"
PUBLISHED_PROTO = REPO / ".cache" / "tgis" / "generation.proto"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not PUBLISHED_PROTO.exists(), reason="published TGIS proto missing; run `make install`"),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def server(tmp_path, tokenizer_dir):
    script = AutoTokenizer.from_pretrained(tokenizer_dir)("Hello world. The end. More text").input_ids
    h = RouterHarness(tmp_path, tokenizer_dir, FakeModel(script=script)).start()
    yield h
    h.close()


def tgis(address: str, calls: list[dict]) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(CLIENT), address], input=json.dumps(calls).encode(), capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)


def test_published_tgis_client_generate_stream_tokenize_and_model_info(server):
    generate_params = {
        "method": "SAMPLE",
        "sampling": {"seed": "42", "temperature": 0.5},
        "stopping": {"maxNewTokens": 20, "stopSequences": ["end."]},
        "response": {"generatedTokens": True, "tokenLogprobs": True, "tokenRanks": True, "inputText": True},
    }
    calls = [
        {"method": "Generate", "request": {"modelId": "any", "requests": [{"text": "Go"}, {"text": "Again"}], "params": generate_params}},
        {"method": "GenerateStream", "request": {"request": {"text": "Go"}, "params": {"stopping": {"maxNewTokens": 4}}}},
        {"method": "Tokenize", "request": {"requests": [{"text": "東京 🙂"}], "returnTokens": True, "returnOffsets": True}},
        {"method": "ModelInfo", "request": {"modelId": "whatever"}},
        {"method": "Generate", "request": {"requests": [{"text": "Go"}], "params": {"stopping": {"maxNewTokens": 100000}}}},
    ]
    generate, stream, tokenize, info, invalid = tgis(server.address, calls)

    assert generate["ok"], generate
    first, second = generate["response"]["responses"]
    assert first["text"] == "GoHello world. The end."
    assert second["text"] == "AgainHello world. The end."
    assert first["stopReason"] == "STOP_SEQUENCE" and first["stopSequence"] == "end."
    assert first["seed"] == "42" and first["inputTokenCount"] == 1
    assert first["generatedTokenCount"] == len(first["tokens"])
    assert all(t["rank"] == 1 and t["logprob"] < 0 for t in first["tokens"])

    assert stream["ok"], stream
    messages = stream["response"]
    assert messages[0]["inputTokenCount"] == 1
    assert [m.get("generatedTokenCount", 0) for m in messages] == [0, 1, 2, 3, 4]
    assert messages[-1]["stopReason"] == "MAX_TOKENS"
    assert "".join(m.get("text", "") for m in messages) == "Hello"  # tokens H, e, ll, o

    assert tokenize["ok"] and tokenize["response"]["responses"][0]["tokenCount"] > 3
    assert len(tokenize["response"]["responses"][0]["offsets"]) == tokenize["response"]["responses"][0]["tokenCount"]
    # DECODER_ONLY is enum value 0, which protobuf JSON leaves out
    assert info["ok"] and info["response"].get("modelKind", "DECODER_ONLY") == "DECODER_ONLY"
    assert info["response"]["maxSequenceLength"] == 256 and info["response"]["maxNewTokens"] == 1024

    assert not invalid["ok"] and invalid["code"] == "INVALID_ARGUMENT" and "max_new_tokens" in invalid["details"]
