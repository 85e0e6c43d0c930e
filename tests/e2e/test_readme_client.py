"""The README's Python client example, run verbatim against a live server on a tiny model.

The code block is taken from README.md's "Python client" section and run
as its own program; only the environment differs (GRPC_PORT, which the
example reads as the launcher does). Its output must be the text the
server generates for the same request.
"""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from readme_text import code_blocks, sections
from text_generation_server.pb.fmaas import generation_pb2, generation_pb2_grpc

from .conftest import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def readme_client() -> str:
    blocks = code_blocks(sections()["Python client"], "python")
    assert blocks, "README.md's Python client section has no python block"
    return blocks[0]


def test_readme_client_block_is_a_whole_program():
    compile(readme_client(), "README.md", "exec")


def test_readme_client_runs_verbatim_against_a_live_server(tiny_llama, tmp_path):
    server = ServerProcess(tmp_path, ["--model-id", str(tiny_llama)]).start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", readme_client()],
            env={**os.environ, "GRPC_PORT": str(server.grpc_port)},
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        # The same request, made here: greedy decoding makes the answer deterministic.
        with grpc.insecure_channel(server.address) as channel:
            reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                generation_pb2.BatchedGenerationRequest(
                    requests=[generation_pb2.GenerationRequest(text="The capital of France is")],
                    params=generation_pb2.Parameters(
                        method=generation_pb2.GREEDY, stopping=generation_pb2.StoppingCriteria(max_new_tokens=10)
                    ),
                ),
                timeout=60,
            )
        assert reply.responses[0].generated_token_count == 10
        assert done.stdout == reply.responses[0].text + "\n"
    finally:
        assert server.stop() == 0, server.log_tail()
