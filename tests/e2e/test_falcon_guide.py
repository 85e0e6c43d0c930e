"""The quantization guide's flow on Falcon, as a user types it: ``text-generation-server quantize
MODEL OUT``, then ``text-generation-launcher --model-id OUT --sharded true --num-shard 2
--quantize gptq``, on a small random Falcon of falcon-40b's layout (grouped KV heads, ln_attn
and ln_mlp, parallel attention) with a tokenizer.

Each generated token's log-probability is transformers' on the weights the checkpoint encodes
(its dense twin), fed the same tokens, within the 4-bit kernel's rounding; each token is the
reference's best or within that rounding of it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO, ServerProcess

sys.path.insert(0, str(REPO / "tests"))

from gptq_random import default_cpu_int4_kernel  # noqa: E402
from gptq_twin import calibration_text, dense_twin  # noqa: E402
from tiny_model import build_random, build_tokenizer  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PROMPTS = ["The capital of France is", "A quick brown fox", "Once upon a time there was"]
NEW_TOKENS = 8
# The native kernel multiplies activations exactly in integers (fp32 within ~3e-5): shard counts
# differ by summation order only. torch's int4 matmul (where the native kernels do not run) rounds
# activations to bf16.
TOLERANCE = 1e-2 if default_cpu_int4_kernel() == "cpu-int4-avx2" else 0.25


@pytest.fixture(scope="module")
def falcon_gptq(tmp_path_factory) -> tuple[Path, Path]:
    import transformers as tf

    tmp = tmp_path_factory.mktemp("falcon-guide")
    config = tf.FalconConfig(
        vocab_size=384, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, parallel_attn=True, ffn_hidden_size=256, layer_norm_epsilon=1e-5,
        max_position_embeddings=256, pad_token_id=3, bos_token_id=1, eos_token_id=2,
    )
    model = build_random(tmp / "falcon-40b-tiny", tf.FalconForCausalLM, config)
    build_tokenizer(model)
    out = tmp / "falcon-40b-tiny-gptq"
    cli = Path(sys.executable).parent / "text-generation-server"
    proc = subprocess.run(
        [str(cli), "quantize", str(model), str(out), "--dataset", str(calibration_text(tmp / "calib.txt")),
         "--nsamples", "8", "--seqlen", "64"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, dense_twin(out, tmp / "twin")


def test_quantized_falcon_serves_on_two_shards_as_transformers_computes_it(falcon_gptq, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, twin = falcon_gptq
    args = ["--model-id", str(checkpoint), "--sharded", "true", "--num-shard", "2", "--quantize", "gptq"]
    server = ServerProcess(tmp_path, args).start(timeout=600)
    try:
        answer = server.greedy(PROMPTS, NEW_TOKENS, top_n=2, timeout=300)
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()
    log = server.log_path.read_text(errors="replace")
    assert "Building FalconForCausalLM for rank 1/2" in log
    if default_cpu_int4_kernel() == "cpu-int4-avx2":
        assert "Execution plan: native-cpu-layers" in log, log[-3000:]

    tok = AutoTokenizer.from_pretrained(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    worst = 0.0
    for p, prompt in enumerate(PROMPTS):
        prompt_ids = tok(prompt).input_ids
        generated = tok.convert_tokens_to_ids(answer.tokens[p])
        assert len(generated) == NEW_TOKENS
        with torch.no_grad():
            logprobs = reference(torch.tensor([prompt_ids + generated])).logits[0].log_softmax(-1)
        for step, token in enumerate(generated):
            want = logprobs[len(prompt_ids) - 1 + step]
            worst = max(worst, abs(float(want[token]) - answer.logprobs[p][step]))
            assert abs(float(want[token]) - answer.logprobs[p][step]) < TOLERANCE, (prompt, step)
            assert float(want.max() - want[token]) < TOLERANCE, (prompt, step, "not the reference's best")
    print(f"falcon-40b layout, GPTQ 4-bit on 2 shards: largest token logprob difference {worst:.2e}")
