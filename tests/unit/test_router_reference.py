"""Text through the router equals transformers' own greedy generate (a real model behind the fake shard).

The fake shard's next token is the argmax of transformers' LlamaForCausalLM
on the full sequence, so everything the router does to turn token ids into
responses (detokenization, EOS, counts) is compared with an independent
reference: ``model.generate`` and ``tokenizer.decode``.
"""

from __future__ import annotations

import pytest
import torch
from fake_shard import FakeModel, RouterHarness
from text_generation_server.pb.fmaas import generation_pb2 as pb
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["The capital of France is", "Unicode: 東京", "def main():"]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return tok, model


def test_greedy_text_and_tokens_match_transformers_generate(tmp_path, tiny_llama, reference):
    tok, model = reference

    @torch.inference_mode()
    def argmax_next(ids: list[int]) -> int:
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())

    h = RouterHarness(tmp_path, tiny_llama, FakeModel(next_token_fn=argmax_next, eos_token_id=tok.eos_token_id)).start()
    try:
        options = pb.ResponseOptions(generated_tokens=True)
        params = pb.Parameters(method=pb.GREEDY, stopping=pb.StoppingCriteria(max_new_tokens=16), response=options)
        reply = h.stub().Generate(
            pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=p) for p in PROMPTS], params=params), timeout=60
        )
        streams = [list(h.stub().GenerateStream(pb.SingleGenerationRequest(request=pb.GenerationRequest(text=p), params=params), timeout=60)) for p in PROMPTS]
    finally:
        h.close()
    for prompt, resp, stream in zip(PROMPTS, reply.responses, streams, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
        assert [t.text for t in resp.tokens] == tok.convert_ids_to_tokens(expected)
        assert resp.generated_token_count == len(expected)
        assert resp.text == tok.decode(expected, skip_special_tokens=True)
        assert resp.stop_reason == (pb.EOS_TOKEN if expected[-1] == tok.eos_token_id else pb.MAX_TOKENS)
        assert "".join(m.text for m in stream) == resp.text
        assert stream[-1].stop_reason == resp.stop_reason
