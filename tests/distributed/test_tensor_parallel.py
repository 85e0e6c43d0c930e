"""Real multi-process tensor parallelism (gloo on CPU) against dense references.

One spawn per world size runs every check in tp_worker.py; the tests below
each pin one behaviour against the saved results.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tp_worker  # noqa: E402
from tiny_model import build_random, build_tiny_llama  # noqa: E402

ATOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer_inputs(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "row.weight": torch.randn(6, 11, generator=g),
        "row.bias": torch.randn(6, generator=g),
        "row.input": torch.randn(4, 11, generator=g),
        # 11 rows: uneven for 2 ranks (6 + 5) and 3 ranks (4 + 4 + 3).
        "vocab.table": torch.randn(11, 5, generator=g),
        "vocab.ids": torch.tensor([0, 10, 5, 6, 3, 4, 7, 8, 1]),
        "vocab.hidden": torch.randn(3, 5, generator=g),
    }
    save_file(tensors, str(path))
    return tensors


@pytest.fixture(scope="module")
def mqa_llama(tmp_path_factory) -> Path:
    """4 query heads sharing 1 KV head: two ranks must each hold a replica of it."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny-mqa"), num_attention_heads=4, num_key_value_heads=1
    )


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    """Qwen3: per-head q/k norms, head_dim (24) apart from hidden / heads; 6 heads over 2 KV heads
    split 3 ways and 2 ways (uneven KV heads there)."""
    import transformers as tf

    config = tf.Qwen3Config(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, head_dim=24,
                            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    return build_random(tmp_path_factory.mktemp("tiny-qwen3"), tf.Qwen3ForCausalLM, config)


@pytest.fixture(scope="module")
def llama_biases(tmp_path_factory) -> Path:
    """Biases on every projection: o_proj's and down_proj's are added once, after the all-reduce."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True)
    return build_random(tmp_path_factory.mktemp("tiny-llama-biases"), tf.LlamaForCausalLM, config)


@pytest.fixture(scope="module")
def tiny_granite(tmp_path_factory) -> Path:
    """Granite 3's multipliers (embedding, residual, attention, logits), tied embeddings."""
    import transformers as tf

    config = tf.GraniteConfig(vocab_size=384, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256,
                              rms_norm_eps=1e-5, embedding_multiplier=12.0, residual_multiplier=0.22,
                              attention_multiplier=0.015625, logits_scaling=8.0, tie_word_embeddings=True)
    return build_random(tmp_path_factory.mktemp("tiny-granite"), tf.GraniteForCausalLM, config)


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory) -> Path:
    """Phi-3: q/k/v and gate/up stored fused, read as parts and split like Llama's (6 heads over 2 KV
    heads on 2 ranks, so the fused tensor's parts split unevenly)."""
    import transformers as tf

    config = tf.Phi3Config(vocab_size=384, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                           rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return build_random(tmp_path_factory.mktemp("tiny-phi3"), tf.Phi3ForCausalLM, config)


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory) -> Path:
    """Gemma 2: soft-capped scores and logits, a sliding window on every other layer (shorter than the
    test's prompt), (1 + w) norms, scaled embeddings; 6 heads over 3 KV heads on 3 ranks."""
    import transformers as tf

    config = tf.Gemma2Config(vocab_size=384, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=3, head_dim=16, query_pre_attn_scalar=24,
                             max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=5,
                             attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return build_random(tmp_path_factory.mktemp("tiny-gemma2"), tf.Gemma2ForCausalLM, config)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory) -> Path:
    """Gemma 3: a local layer (window 5, base 10 000) and a global one (base 1e6, linear 8), each
    rotating by its own table; (1 + w) q/k head norms; 6 heads over 3 KV heads split 2 ways."""
    import transformers as tf

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}
    config = tf.Gemma3TextConfig(vocab_size=384, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=3, head_dim=16, query_pre_attn_scalar=24,
                                 layer_types=["sliding_attention", "full_attention"], sliding_window=5,
                                 rope_parameters=rope, max_position_embeddings=256, rms_norm_eps=1e-5,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return build_random(tmp_path_factory.mktemp("tiny-gemma3"), tf.Gemma3ForCausalLM, config)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> Path:
    """Mixtral: 4 experts, top 2, every expert split across the ranks (intermediate 96: 48/48,
    32/32/32); 6 heads over 3 KV heads."""
    import transformers as tf

    config = tf.MixtralConfig(vocab_size=384, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=6, num_key_value_heads=3, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    return build_random(tmp_path_factory.mktemp("tiny-mixtral"), tf.MixtralForCausalLM, config)


@pytest.fixture(scope="module")
def gptq_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """GPTQ checkpoints (g32, act-order, as GPTQModel lays them out) and their dequantized twins:
    Mixtral (each expert's w1/w2/w3 on its own), Phi-3 (qkv_proj and gate_up_proj quantized
    fused) and Falcon of falcon-40b's layout (query_key_value fused with its heads interleaved).
    Widths split into whole groups of 32 on 2 and 3 ranks."""
    import transformers as tf
    from gptq_checkpoint import write_gptq_checkpoint

    base = dict(vocab_size=384, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    configs = {
        "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig(**base, intermediate_size=128, num_key_value_heads=2,
                                                            num_local_experts=4, num_experts_per_tok=2)),
        "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**base, intermediate_size=128, num_key_value_heads=2)),
        "falcon-40b": (tf.FalconForCausalLM, tf.FalconConfig(**base, num_kv_heads=2, new_decoder_architecture=True,
                                                            parallel_attn=True, ffn_hidden_size=128)),
    }
    root = tmp_path_factory.mktemp("gptq-archs")
    out = {}
    for name, (cls, config) in configs.items():
        dense = build_random(root / name, cls, config)
        out[name] = write_gptq_checkpoint(dense, root / f"{name}-gptq", group_size=32, desc_act=True)
    return out


@pytest.fixture(scope="module")
def tiny_falcon7b(tmp_path_factory) -> Path:
    """falcon-7b's layout: one KV head (replicated on every rank), 5 query heads (split 3/2 and
    2/2/1), one LayerNorm read by both parallel blocks, tied embeddings."""
    import transformers as tf

    config = tf.FalconConfig(vocab_size=384, hidden_size=80, num_hidden_layers=2, num_attention_heads=5,
                             multi_query=True, parallel_attn=True, ffn_hidden_size=96, layer_norm_epsilon=1e-5,
                             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return build_random(tmp_path_factory.mktemp("tiny-falcon7b"), tf.FalconForCausalLM, config)


@pytest.fixture(scope="module")
def tiny_falcon40b(tmp_path_factory) -> Path:
    """falcon-40b's layout: 6 query heads over 2 KV groups (3 ranks: two share the first group),
    ln_attn and ln_mlp, with biases."""
    import transformers as tf

    config = tf.FalconConfig(vocab_size=384, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                             new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=True,
                             ffn_hidden_size=96, layer_norm_epsilon=1e-5, max_position_embeddings=256,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return build_random(tmp_path_factory.mktemp("tiny-falcon40b"), tf.FalconForCausalLM, config)


def spawn(world_size: int, tmp: Path, models: list[Path]) -> dict:
    layer_file = tmp / "layers.safetensors"
    inputs = layer_inputs(layer_file)
    mp.spawn(
        tp_worker.run_rank,
        args=(world_size, free_port(), str(layer_file), [str(m) for m in models], str(tmp)),
        nprocs=world_size,
        join=True,
    )
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    return {"inputs": inputs, "ranks": ranks, "models": [str(m) for m in models]}


@pytest.fixture(scope="module")
def world2(request, tmp_path_factory, tiny_llama, tiny_llama_tied, mqa_llama, gptq_models) -> dict:
    models = [tiny_llama_tied, tiny_llama, mqa_llama, *(request.getfixturevalue(a) for a in ARCHITECTURES),
              *(q for q, _ in gptq_models.values())]
    # The GPTQ checkpoints through the reference kernel: exactly their dequantized weights.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTQ_KERNEL", "gptq-reference")
        return spawn(2, tmp_path_factory.mktemp("tp2"), models)


@pytest.fixture(scope="module")
def world3(request, tmp_path_factory, tiny_llama_tied, gptq_models) -> dict:
    models = [tiny_llama_tied, *(request.getfixturevalue(a) for a in ARCHITECTURES),
              *(q for q, _ in gptq_models.values())]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTQ_KERNEL", "gptq-reference")
        return spawn(3, tmp_path_factory.mktemp("tp3"), models)


@pytest.fixture(params=["world2", "world3"])
def run(request) -> dict:
    return request.getfixturevalue(request.param)


_reference_cache: dict[tuple, torch.Tensor] = {}


def reference(model_dir: str, ids: list[int]) -> torch.Tensor:
    key = (model_dir, tuple(ids))
    if key not in _reference_cache:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            _reference_cache[key] = model(torch.tensor([ids])).logits[0]
    return _reference_cache[key]


def test_all_reduce_sums_and_all_gather_concatenates_uneven_pieces(run):
    world = len(run["ranks"])
    total = sum(range(1, world + 1))
    expected_gather = torch.cat(
        [
            torch.arange(2 * (r + 1), dtype=torch.float32).reshape(2, r + 1) + 100 * r
            for r in range(world)
        ],
        dim=1,
    )
    for result in run["ranks"]:
        c = result["collectives"]
        torch.testing.assert_close(c["all_reduce"], torch.full((3,), float(total)))
        torch.testing.assert_close(c["all_reduce_bf16"], torch.full((2,), float(total)))
        torch.testing.assert_close(c["all_gather"], expected_gather, rtol=0, atol=0)
        torch.testing.assert_close(c["all_gather_sizes"], expected_gather, rtol=0, atol=0)


def test_row_parallel_output_equals_the_dense_matmul_with_bias_added_once(run):
    t = run["inputs"]
    expected = F.linear(t["row.input"], t["row.weight"], t["row.bias"])
    for result in run["ranks"]:
        torch.testing.assert_close(result["layers"]["row_parallel"], expected, atol=1e-5, rtol=0)


def test_embedding_and_lm_head_with_a_vocab_that_does_not_divide_evenly(run):
    t = run["inputs"]
    for result in run["ranks"]:
        layers = result["layers"]
        torch.testing.assert_close(
            layers["embedding"], F.embedding(t["vocab.ids"], t["vocab.table"])
        )
        torch.testing.assert_close(layers["lm_head"], t["vocab.hidden"] @ t["vocab.table"].T)


def check_model(run: dict, model_dir: str, reference_dir: str | None = None) -> None:
    """``model_dir`` served on the run's ranks equals transformers on ``reference_dir`` (by
    default the same checkpoint)."""
    results = [r[f"model:{model_dir}"] for r in run["ranks"]]
    ids = tp_worker.PROMPT + tp_worker.DECODE
    ref = reference_dir or model_dir
    full = reference(ref, ids)
    first = results[0]
    torch.testing.assert_close(first["prefill"], full[: len(tp_worker.PROMPT)], atol=ATOL, rtol=0)
    torch.testing.assert_close(first["decode"], full[len(tp_worker.PROMPT) :], atol=ATOL, rtol=0)
    for i, (seq_id, seq) in enumerate(tp_worker.BATCH.items()):
        whole = reference(ref, seq + [tp_worker.BATCH_NEXT[seq_id]])
        torch.testing.assert_close(first["batch_prefill"][i], whole[:-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(first["batch_decode"][i], whole[-1], atol=ATOL, rtol=0)
    # Logits are all-gathered, so every rank sees exactly the same numbers.
    for other in results[1:]:
        torch.testing.assert_close(other["prefill"], first["prefill"], atol=0, rtol=0)
        torch.testing.assert_close(other["decode"], first["decode"], atol=0, rtol=0)


def test_tied_model_with_uneven_gqa_split_equals_transformers_at_world_size_2(
    world2, tiny_llama_tied
):
    results = [r[f"model:{tiny_llama_tied}"] for r in world2["ranks"]]
    assert [r["num_kv_heads"] for r in results] == [2, 1]
    assert results[0]["tp_plan"].startswith(
        "2 shards: q heads 4/2, kv heads 2/1 (uneven GQA split)"
    )
    check_model(world2, str(tiny_llama_tied))


def test_untied_model_equals_transformers_at_world_size_2(world2, tiny_llama):
    check_model(world2, str(tiny_llama))


def test_replicated_kv_head_model_equals_transformers_at_world_size_2(world2, mqa_llama):
    results = [r[f"model:{mqa_llama}"] for r in world2["ranks"]]
    assert [r["num_kv_heads"] for r in results] == [1, 1]
    assert "KV heads replicated" in results[0]["tp_plan"]
    check_model(world2, str(mqa_llama))


def test_tied_model_equals_transformers_at_world_size_3(world3, tiny_llama_tied):
    results = [r[f"model:{tiny_llama_tied}"] for r in world3["ranks"]]
    assert [r["num_kv_heads"] for r in results] == [1, 1, 1]
    assert "mlp 43/43/42" in results[0]["tp_plan"]
    check_model(world3, str(tiny_llama_tied))


# Every architecture beside Llama, on 2 and 3 shards. Head counts the shard count does not divide
# (6 heads / 3 KV heads on 2 ranks; 5 heads / 1 KV head on 2 and 3; 2 KV heads shared by 3 ranks).
ARCHITECTURES = ["llama_biases", "tiny_qwen3", "tiny_granite", "tiny_phi3", "tiny_gemma2", "tiny_gemma3",
                 "tiny_falcon7b", "tiny_falcon40b", "tiny_mixtral"]
# KV heads per rank where a rank holds a share of one (replicated or regrouped).
KV_HEADS = {
    ("tiny_phi3", "world2"): [1, 1], ("tiny_phi3", "world3"): [1, 1, 1],
    ("tiny_falcon7b", "world2"): [1, 1], ("tiny_falcon7b", "world3"): [1, 1, 1],
    ("tiny_falcon40b", "world2"): [1, 1], ("tiny_falcon40b", "world3"): [1, 1, 1],
}


@pytest.mark.parametrize("world", ["world2", "world3"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_equals_transformers_on_2_and_3_shards_through_the_native_layers(
    request, world, arch, record_property
):
    run, path = request.getfixturevalue(world), request.getfixturevalue(arch)
    results = [r[f"model:{path}"] for r in run["ranks"]]
    if tp_worker_native():
        assert {r["plan"] for r in results} == {"native-cpu-layers"}
    if (arch, world) in KV_HEADS:
        assert [r["num_kv_heads"] for r in results] == KV_HEADS[arch, world]
    check_model(run, str(path))
    ids = tp_worker.PROMPT + tp_worker.DECODE
    got = torch.cat([results[0]["prefill"], results[0]["decode"]])[:-1]
    want = reference(str(path), ids)[:-1]
    lp = (got.log_softmax(-1) - want.log_softmax(-1))[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].abs().max()
    record_property(f"figures: {arch} on {len(results)} shards",
                    f"{results[0]['plan']}, largest token logprob difference {float(lp):.1e}")


@pytest.mark.parametrize("dtype", tp_worker.HALF_DTYPES, ids=["bf16", "fp16"])
def test_16_bit_weights_on_2_and_3_shards_stay_within_their_rounding_of_transformers(run, dtype):
    """The first model served in bf16 / fp16 (the native layers on each rank multiply the 16-bit
    weights by float32 activations, all-reduced in float32): every rank's logits within the
    dtype's rounding of transformers in float32 (the single-shard bound of the family test)."""
    model = run["models"][0]
    results = [r[f"model:{model}:{dtype}"] for r in run["ranks"]]
    if tp_worker_native():
        assert {r["plan"] for r in results} == {"native-cpu-layers"}
    ids = tp_worker.PROMPT + tp_worker.DECODE
    want = reference(model, ids)[:-1]
    for r in results:
        got = torch.cat([r["prefill"], r["decode"]])[:-1]
        rel = float((got - want).norm() / want.norm())
        assert rel < (8e-2 if dtype == torch.bfloat16 else 1e-2), rel
        torch.testing.assert_close(r["decode"], results[0]["decode"], rtol=0, atol=0)


@pytest.mark.parametrize("world", ["world2", "world3"])
@pytest.mark.parametrize("arch", ["mixtral", "phi3", "falcon-40b"])
def test_gptq_checkpoints_of_fused_and_expert_layouts_split_in_whole_groups(request, world, arch, gptq_models):
    quantized, dense = gptq_models[arch]
    check_model(request.getfixturevalue(world), str(quantized), reference_dir=str(dense))


def tp_worker_native() -> bool:
    from text_generation_server.kernels import cpu_ops_status

    return cpu_ops_status().available
