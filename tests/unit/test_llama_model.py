"""The Llama-family model on one shard equals transformers' own forward.

Every comparison runs the same checkpoint through transformers
(AutoModelForCausalLM, float32, whole sequence at once) and through our model
with a paged KV cache whose blocks are handed out out of order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from paged_runner import PagedRunner
from safetensors.torch import load_file, save_file
from text_generation_server.distributed import init_distributed
from text_generation_server.models import (
    CheckpointError,
    UnsupportedModelError,
    load_model,
    supported_architectures,
)
from tiny_model import SMALL, build_random, family_checkpoint

CPU = torch.device("cpu")
ATOL = 1e-4

_loaded: dict[tuple[str, torch.dtype, bool], object] = {}


def ours(path: Path, dtype: torch.dtype = torch.float32):
    from text_generation_server.kernels import cpu_ops_status

    # Models built with and without the native kernels take different decode paths.
    key = (str(path), dtype, cpu_ops_status().available)
    if key not in _loaded:
        _loaded[key] = load_model(path, dtype=dtype, device=CPU, dist=init_distributed(0, 1))
    return _loaded[key]


def reference_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(params=["tiny_llama", "tiny_llama_tied"])
def checkpoint(request) -> Path:
    return request.getfixturevalue(request.param)


def test_model_reports_its_shape_and_plan(tiny_llama_tied):
    model = ours(tiny_llama_tied)
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 3, 16)
    assert model.vocab_size == 384 and model.dtype == torch.float32
    assert model.kernel == "dense-fp32"
    assert "6 q heads, 3 kv heads" in model.tp_plan
    # Tied embeddings: the LM head is the embedding table, not a copy.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_prefill_logits_equal_transformers(checkpoint):
    ids = random_ids(13, 384, seed=1)
    logits = PagedRunner(ours(checkpoint)).step([("a", ids)])[0]
    torch.testing.assert_close(logits, reference_logits(checkpoint, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_then_paged_decode_matches_transformers(checkpoint, block_size, cpu_kernels):
    """Decode steps take the native decoder stack where the kernels run, the modules otherwise."""
    ids = random_ids(20, 384, seed=2)
    expected = reference_logits(checkpoint, ids)
    model = ours(checkpoint)
    assert model.plan.name == ("native-cpu-stack" if cpu_kernels == "native" else "modules"), model.plan.describe()
    runner = PagedRunner(model, block_size=block_size, seed=block_size)
    prompt = 6
    runner.step([("a", ids[:prompt])])
    for pos in range(prompt, len(ids)):
        step = runner.step([("a", [ids[pos]])])[0]
        torch.testing.assert_close(step[0], expected[pos], atol=ATOL, rtol=0)
    blocks = runner.blocks["a"]
    assert len(blocks) >= 2 and len(set(blocks)) == len(blocks)
    assert any(b != a + 1 for a, b in zip(blocks, blocks[1:], strict=False))  # not contiguous


def test_batch_of_sequences_equals_each_sequence_alone(checkpoint, cpu_kernels):
    model = ours(checkpoint)
    seqs = {"a": random_ids(3, 384, 3), "b": random_ids(11, 384, 4), "c": random_ids(7, 384, 5)}
    batched = PagedRunner(model)
    together = batched.step(list(seqs.items()))
    for (seq_id, ids), logits in zip(seqs.items(), together, strict=True):
        alone = PagedRunner(model, seed=7).step([(seq_id, ids)])[0]
        torch.testing.assert_close(logits, alone, atol=ATOL, rtol=0)
    # One batched decode step for all three continues each sequence correctly.
    next_ids = {"a": 17, "b": 250, "c": 3}
    step = batched.step([(k, [v]) for k, v in next_ids.items()])
    for (seq_id, ids), logits in zip(seqs.items(), step, strict=True):
        expected = reference_logits(checkpoint, ids + [next_ids[seq_id]])[-1]
        torch.testing.assert_close(logits[0], expected, atol=ATOL, rtol=0)


def test_chunk_with_existing_context_equals_the_full_run(checkpoint):
    ids = random_ids(8, 384, seed=6)
    expected = reference_logits(checkpoint, ids)
    runner = PagedRunner(ours(checkpoint), block_size=4)
    first = runner.step([("a", ids[:5])])[0]
    second = runner.step([("a", ids[5:])])[0]
    torch.testing.assert_close(torch.cat([first, second]), expected, atol=ATOL, rtol=0)


def test_mixed_batch_of_decode_chunk_and_prefill_equals_transformers(tiny_llama_tied):
    model = ours(tiny_llama_tied)
    runner = PagedRunner(model, block_size=4)
    a, b, c = random_ids(9, 384, 7), random_ids(10, 384, 8), random_ids(5, 384, 9)
    runner.step([("a", a[:8]), ("b", b[:4])])
    out = runner.step([("a", a[8:]), ("b", b[4:]), ("c", c)])
    torch.testing.assert_close(out[0], reference_logits(tiny_llama_tied, a)[8:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], reference_logits(tiny_llama_tied, b)[4:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], reference_logits(tiny_llama_tied, c), atol=ATOL, rtol=0)


def test_bfloat16_model_stays_close_to_float32(tiny_llama):
    ids = random_ids(9, 384, seed=10)
    model = ours(tiny_llama, torch.bfloat16)
    assert model.kernel == "dense-bf16"
    logits = PagedRunner(model).step([("a", ids)])[0]
    assert logits.dtype == torch.float32
    expected = reference_logits(tiny_llama, ids)
    # bf16 keeps ~3 significant digits; the greedy choice should almost always agree.
    agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.75
    assert (logits - expected).abs().max() < 0.15 * expected.abs().max()


# ---------------------------------------------------------------- other family members


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["qwen3", "granite", "phi3", "gemma2", "gemma3", "mixtral", "falcon-7b", "falcon-40b",
                                  "mistral-window"])
def test_family_members_in_half_dtypes_stay_close_to_float32(tmp_path, kind, dtype, cpu_kernels):
    """Served in bf16 / fp16 (prefill through the modules in that dtype, decode through the native
    layers with float32 activations where the kernels run), prefill and decode stay within the
    dtype's rounding of transformers in float32: the logits within 8% (bf16) / 1% (fp16) of their
    norm, the greedy choice mostly the same. Measured on the modules: bf16 0.6-4.2% (Gemma 2 the
    most; transformers' own bf16 is at 3.4% there), fp16 0.1-0.4%; native decode: bf16 0.5-1.5%,
    fp16 0.07-0.2%."""
    path = family_checkpoint(tmp_path, kind)
    ids = random_ids(24, 384, seed=12)
    expected = reference_logits(path, ids)
    model = load_model(path, dtype=dtype, device=CPU, dist=init_distributed(0, 1))
    assert model.plan.name == ("native-cpu-stack" if cpu_kernels == "native" else "modules"), model.plan.describe()
    runner = PagedRunner(model, block_size=4)
    logits = torch.cat([runner.step([("a", ids[:16])])[0]] + [runner.step([("a", [t])])[0] for t in ids[16:]])
    assert torch.isfinite(logits).all()
    rel = float((logits - expected).norm() / expected.norm())
    assert rel < (8e-2 if dtype == torch.bfloat16 else 1e-2), rel
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_weights_decode_natively_as_float32_arithmetic_on_their_values(tmp_path, tiny_llama, dtype):
    """A 16-bit model's native steps multiply its weights as they are by float32 activations: a
    short prompt and the decode steps after it (all native) with a float32 KV cache give
    transformers' float32 logits on the same rounded weights (measured 1.4e-6 of the logits'
    scale); with the model's own 16-bit cache, but for that cache's rounding (measured: bf16
    9e-3, fp16 1.2e-3)."""
    from text_generation_server.kernels import cpu_ops_status

    if not cpu_ops_status().available:
        pytest.skip(f"native CPU kernels unavailable: {cpu_ops_status().reason}")
    rounded = tmp_path / "rounded"
    shutil.copytree(tiny_llama, rounded)
    weights = rounded / "model.safetensors"
    save_file({k: v.to(dtype).float() for k, v in load_file(str(weights)).items()}, str(weights))
    ids = random_ids(16, 384, seed=13)
    expected = reference_logits(rounded, ids)
    scale = float(expected.abs().max())
    model = load_model(rounded, dtype=dtype, device=CPU, dist=init_distributed(0, 1))
    assert model.plan.name == "native-cpu-stack", model.plan.describe()
    assert model.kernel == ("dense-bf16" if dtype == torch.bfloat16 else "dense-fp16")
    for kv_dtype, tol in ((torch.float32, 1e-5), (dtype, 2e-2 if dtype == torch.bfloat16 else 3e-3)):
        runner = PagedRunner(model, block_size=4, kv_dtype=kv_dtype)
        logits = torch.cat([runner.step([("a", ids[:10])])[0]] + [runner.step([("a", [t])])[0] for t in ids[10:]])
        torch.testing.assert_close(logits, expected, rtol=0, atol=tol * scale)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "granite", "phi3", "gemma2", "gemma3", "mixtral", "falcon-7b", "falcon-40b", "falcon-seq", "mistral", "mistral-window", "qwen2-window", "llama-biases", "llama3-rope", "linear-rope"])
def test_family_members_equal_transformers_through_prefill_and_decode(tmp_path, kind, cpu_kernels, record_property):
    path = family_checkpoint(tmp_path, kind)
    ids = random_ids(40, 384, seed=11)
    expected = reference_logits(path, ids)
    model = ours(path)
    # Every family member decodes through the native stack where the kernels run.
    assert model.plan.name == ("native-cpu-stack" if cpu_kernels == "native" else "modules"), model.plan.describe()
    runner = PagedRunner(model, block_size=4)
    prefill = runner.step([("a", ids[:30])])[0]
    torch.testing.assert_close(prefill, expected[:30], atol=ATOL, rtol=0)
    decode = []
    for pos in range(30, 40):
        decode.append(runner.step([("a", [ids[pos]])])[0][0])
        torch.testing.assert_close(decode[-1], expected[pos], atol=ATOL, rtol=0)
    got = torch.cat([prefill, torch.stack(decode)])
    # Each prompt token's logprob (the next id's), as the closing figures report it.
    lp = (got.log_softmax(-1) - expected.log_softmax(-1))[torch.arange(39), torch.tensor(ids[1:])].abs().max()
    record_property(f"figures: {kind}", f"{model.plan.name}, largest prompt-token logprob difference {float(lp):.1e}")


def test_multi_file_checkpoint_with_index_loads_the_same_model(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(
        sharded, max_shard_size="100KB"
    )
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ids = random_ids(10, 384, seed=12)
    a = PagedRunner(ours(tiny_llama)).step([("a", ids)])[0]
    b = PagedRunner(ours(sharded)).step([("a", ids)])[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------- errors users see


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture_is_named_with_the_supported_list(tmp_path, tiny_llama):
    path = copy_checkpoint(tiny_llama, tmp_path / "gpt2ish")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1))
    text = str(e.value)
    assert "GPT2LMHeadModel" in text
    assert "supported architectures: " + ", ".join(supported_architectures()) in text
    assert {"FalconForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM", "LlamaForCausalLM",
            "MistralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(
        supported_architectures()
    )


def test_missing_tensor_names_the_tensor_file_and_expected_shape(tmp_path, tiny_llama):
    path = copy_checkpoint(tiny_llama, tmp_path / "broken")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1))
    text = str(e.value)
    assert "'model.layers.1.self_attn.k_proj.weight' (shape [32, 64])" in text
    assert "model.safetensors" in text


def test_wrong_tensor_shape_names_the_tensor_file_and_expected_shape(tmp_path, tiny_llama):
    path = copy_checkpoint(tiny_llama, tmp_path / "misshapen")
    tensors = load_file(str(path / "model.safetensors"))
    down = "model.layers.0.mlp.down_proj.weight"
    tensors[down] = tensors[down].T.contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=rf"'{down}' in model.safetensors has shape \[128, 64\], expected \[64, 128\]",
    ):
        load_model(path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1))


def test_directory_without_config_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1))


def test_unsupported_quantization_flag_is_refused_before_loading(tiny_llama):
    with pytest.raises(ValueError, match="unsupported quantization 'awq'"):
        load_model(
            tiny_llama, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1), quantize="awq"
        )


def test_checkpoint_without_lm_head_reuses_the_embedding_table(tmp_path, tiny_llama):
    path = copy_checkpoint(tiny_llama, tmp_path / "headless")
    tensors = load_file(str(path / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    del tensors["lm_head.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1))
    assert model.lm_head.tied
    hidden = torch.randn(2, embed.shape[1])
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ embed.T)


def test_each_rank_reads_and_holds_only_its_shard(tiny_llama_tied, monkeypatch):
    from text_generation_server.distributed import Distributed
    from text_generation_server.weights import Weights

    whole_reads: list[str] = []
    original = Weights.get_tensor

    def recording_get_tensor(self, name, **kwargs):
        whole_reads.append(name)
        return original(self, name, **kwargs)

    monkeypatch.setattr(Weights, "get_tensor", recording_get_tensor)
    full = dict(load_file(str(tiny_llama_tied / "model.safetensors")))
    held = {}
    for rank in range(2):
        # Loading needs no collectives, so a rank of a 2-world can be built in-process.
        dist = Distributed(rank, 2, CPU, "none")
        model = load_model(tiny_llama_tied, dtype=torch.float32, device=CPU, dist=dist)
        held[rank] = {n: p.shape for n, p in model.named_parameters()}
    # Only replicated tensors (the RMSNorm weights) are read whole.
    assert whole_reads and all(n.endswith("norm.weight") for n in whole_reads)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert held[0][qkv] == (8 * 16, 96) and held[1][qkv] == (4 * 16, 96)  # heads 4+2+2 / 2+1+1
    assert held[0]["model.layers.0.self_attn.o_proj.weight"] == (96, 64)
    assert held[1]["model.layers.0.self_attn.o_proj.weight"] == (96, 32)
    assert held[0]["model.embed_tokens.weight"] == (192, 96) == held[1]["model.embed_tokens.weight"]
    mlp = "model.layers.1.mlp.down_proj.weight"
    assert held[0][mlp][1] + held[1][mlp][1] == full[mlp].shape[1]


@pytest.mark.parametrize("arch", ["qwen3", "granite", "phi3", "gemma2", "gemma3", "mixtral", "falcon-7b", "falcon-40b"])
def test_family_member_quantized_by_our_quantizer_serves_its_encoded_weights_natively(
    tmp_path, arch, cpu_kernels, monkeypatch
):
    """Through `quantize` (Qwen3's q/k norms stay float; Granite's multipliers live outside the
    linears), then served through the GPTQ layers: the reference kernel reproduces transformers over
    the weights the checkpoint encodes; the default 4-bit kernel, decoding through the native stack
    where it runs, stays within its rounding of it."""
    import transformers as tf
    from gptq_random import default_cpu_int4_kernel
    from gptq_twin import calibration_text, dense_twin, run_quantizer
    from tiny_model import build_tokenizer

    # Widths the native 4-bit kernel takes unpadded (multiples of 64).
    small = {**SMALL, "intermediate_size": 128}
    if arch == "qwen3":
        model_cls, config = tf.Qwen3ForCausalLM, tf.Qwen3Config(**small, head_dim=32, tie_word_embeddings=False)
    elif arch == "phi3":  # fused qkv_proj / gate_up_proj, quantized and stored fused
        model_cls, config = tf.Phi3ForCausalLM, tf.Phi3Config(**small, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif arch.startswith("falcon"):  # parallel blocks; the fused query_key_value regrouped when served
        layout = {"falcon-7b": dict(multi_query=True),
                  "falcon-40b": dict(new_decoder_architecture=True, num_kv_heads=2)}[arch]  # fmt: skip
        model_cls, config = tf.FalconForCausalLM, tf.FalconConfig(
            vocab_size=384, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=128,
            layer_norm_epsilon=1e-5, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            **layout)
    elif arch == "mixtral":  # each expert calibrated on the tokens routed to it, written on its own
        model_cls, config = tf.MixtralForCausalLM, tf.MixtralConfig(
            **small, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "gemma3":  # Gemma 2's norms, q/k head norms, two rotary tables
        model_cls, config = tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
            **small, head_dim=32, sliding_window=7, layer_types=["sliding_attention", "full_attention"],
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif arch == "gemma2":  # block-output norms between the linears; soft caps and windows outside them
        model_cls, config = tf.Gemma2ForCausalLM, tf.Gemma2Config(
            **small, head_dim=32, sliding_window=7, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        model_cls, config = tf.GraniteForCausalLM, tf.GraniteConfig(
            **small, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
            logits_scaling=8.0, tie_word_embeddings=True)
    path = build_random(tmp_path / arch, model_cls, config)
    build_tokenizer(path)  # the calibration text is tokenized with the model's tokenizer
    out = run_quantizer(path, tmp_path / f"{arch}-gptq", calibration_text(tmp_path / "calib.txt"), "--groupsize", "32")
    twin = dense_twin(out, tmp_path / "twin")
    ids = random_ids(24, 384, seed=13)
    want = reference_logits(twin, ids)

    def served(kernel: str | None):
        if kernel:
            monkeypatch.setenv("GPTQ_KERNEL", kernel)
        else:
            monkeypatch.delenv("GPTQ_KERNEL", raising=False)
        model = load_model(out, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1), quantize="gptq")
        runner = PagedRunner(model, block_size=4)
        logits = [runner.step([("a", ids[:16])])[0]]
        logits += [runner.step([("a", [t])])[0] for t in ids[16:]]
        return model, torch.cat(logits)

    model, got = served("gptq-reference")
    assert model.kernel == "gptq-reference"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    model, got = served(None)
    assert model.kernel == default_cpu_int4_kernel()
    assert model.plan.name == ("native-cpu-stack" if cpu_kernels == "native" else "modules"), model.plan.describe()
    assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("kind", ["mistral-window", "qwen2-window", "gemma2", "gemma3", "mixtral"])
def test_sliding_window_through_chunked_prefill_and_a_batch_of_decodes(tmp_path, kind, cpu_kernels):
    """Prefill in two chunks (the second attends to cached keys through the window), then batched
    decode steps of two sequences of different lengths, both past the window (Mixtral's tokens
    routed to different experts within one step)."""
    path = family_checkpoint(tmp_path, kind)
    model = ours(path)
    windows = model.sliding_windows
    expected = {"mistral-window": [7, 7], "qwen2-window": [None, 9], "gemma2": [7, None, 7],
                "gemma3": [7] * 5 + [None], "mixtral": [9, 9]}[kind]  # fmt: skip
    assert windows == expected, windows
    assert "sliding window" in model.tp_plan
    a, b = random_ids(30, 384, seed=21), random_ids(19, 384, seed=22)
    runner = PagedRunner(model, block_size=4)
    first = runner.step([("a", a[:12]), ("b", b[:5])])
    second = runner.step([("a", a[12:24]), ("b", b[5:15])])
    want_a, want_b = reference_logits(path, a), reference_logits(path, b)
    torch.testing.assert_close(torch.cat([first[0], second[0]]), want_a[:24], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([first[1], second[1]]), want_b[:15], atol=ATOL, rtol=0)
    for step in range(4):
        out = runner.step([("a", [a[24 + step]]), ("b", [b[15 + step]])])
        torch.testing.assert_close(out[0][0], want_a[24 + step], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1][0], want_b[15 + step], atol=ATOL, rtol=0)


def test_phi3_long_context_rope_is_refused_naming_it(tmp_path):
    import transformers as tf
    from text_generation_server.models import check_model_config

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
            "original_max_position_embeddings": 64}
    config = tf.Phi3Config(**SMALL, rope_parameters=rope, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = build_random(tmp_path, tf.Phi3ForCausalLM, config)
    for attempt in (lambda: check_model_config(path),
                    lambda: load_model(path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1))):
        with pytest.raises(UnsupportedModelError, match="longrope.*not built"):
            attempt()
