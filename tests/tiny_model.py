"""Tiny Llama-family checkpoints for tests: random weights, a small
tokenizer trained in-process, written as config.json + safetensors in a
second or two. Nothing here touches the network."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "In the beginning was the Word, and the Word was with God.",
    "A quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "Unicode: café, naïve, 東京, emoji 🙂, ümlaut.",
    "def main():\n    print('hello world')\n",
    "Once upon a time there was a small model that generated text over gRPC.",
]


# A ChatML-like template that refuses roles it does not know, as real templates do.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tokenizer(path: Path, vocab_size: int = 384):
    """A byte-level BPE tokenizer with <s>, </s>, <unk>, <pad> and a chat template; saved to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_tiny_llama(
    path: Path,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    **config_overrides,
) -> Path:
    """Write a random LlamaForCausalLM checkpoint (safetensors) plus tokenizer to path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Default init is too small to give a varied greedy output; widen it so
    # token choices differ between prompts and positions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"], cfg["architectures"]
    return path


def build_random(path: Path, model_cls, config) -> Path:
    """Save a random transformers checkpoint of ``model_cls(config)`` where biases and norm weights
    are non-trivial too (a norm of ones or a zero bias would hide a misplaced one)."""
    import torch

    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


# Small shapes the family checkpoints share.
SMALL = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def family_checkpoint(tmp_path: Path, kind: str) -> Path:
    """A small random checkpoint of a Llama family member (``kind``), each with the features that
    set it apart switched on."""
    import transformers as tf

    if kind == "qwen2":
        return build_random(
            tmp_path, tf.Qwen2ForCausalLM, tf.Qwen2Config(**SMALL, tie_word_embeddings=False)
        )
    if kind == "qwen3":
        # head_dim 32 is not hidden_size / heads (16): Qwen3 sets it apart.
        return build_random(
            tmp_path, tf.Qwen3ForCausalLM, tf.Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False)
        )
    if kind == "granite":
        # Granite 3's multipliers: none of them 1, so a missing one shows.
        config = tf.GraniteConfig(**SMALL, embedding_multiplier=12.0, residual_multiplier=0.22,
                                  attention_multiplier=0.015625, logits_scaling=8.0, tie_word_embeddings=True)
        return build_random(tmp_path, tf.GraniteForCausalLM, config)
    if kind == "phi3":
        # q/k/v and gate/up stored fused; Phi-3-mini's sliding window, shorter than the test's sequences.
        config = tf.Phi3Config(**SMALL, sliding_window=11, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return build_random(tmp_path, tf.Phi3ForCausalLM, config)
    if kind == "gemma2":
        # Softcapped scores and logits, alternating windows (7, shorter than the sequences), four
        # (1 + w) norms per layer, scaled embeddings, query_pre_attn_scalar apart from head_dim.
        config = tf.Gemma2Config(**{**SMALL, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=24,
                                 sliding_window=7, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return build_random(tmp_path, tf.Gemma2ForCausalLM, config)
    if kind == "mixtral":
        # 4 experts, top 2, Mistral's sliding window shorter than the test's sequences.
        config = tf.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, sliding_window=9)
        return build_random(tmp_path, tf.MixtralForCausalLM, config)
    if kind == "gemma3":
        # (1 + w) q/k head norms; local layers (window 7, base 10 000) and a global one (base 1e6,
        # linear scaling 8) rotating by different tables; 6 layers, the pattern's 5 local + 1 global.
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}
        config = tf.Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 6}, head_dim=16, query_pre_attn_scalar=24,
                                     sliding_window=7, rope_parameters=rope, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)
        return build_random(tmp_path, tf.Gemma3ForCausalLM, config)
    if kind.startswith("falcon"):
        # falcon-7b: multi-query, one LayerNorm read by both parallel blocks; falcon-40b: grouped KV
        # heads (2 groups of 2), ln_attn and ln_mlp; falcon-seq: the older per-head [q, k, v]
        # layout run one block after the other, with biases everywhere.
        base = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, layer_norm_epsilon=1e-5, ffn_hidden_size=96,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        layout = {
            "falcon-7b": dict(multi_query=True, parallel_attn=True),
            "falcon-40b": dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True),
            "falcon-seq": dict(multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False),
        }[kind]
        return build_random(tmp_path, tf.FalconForCausalLM, tf.FalconConfig(**base, **layout))
    if kind == "mistral-window":
        # A window shorter than the test's sequences, not a multiple of the block size.
        return build_random(tmp_path, tf.MistralForCausalLM, tf.MistralConfig(**SMALL, sliding_window=7, head_dim=16))
    if kind == "qwen2-window":
        # Qwen2's layers from max_window_layers on slide; the first attends to everything.
        config = tf.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=9, max_window_layers=1,
                                tie_word_embeddings=False)
        return build_random(tmp_path, tf.Qwen2ForCausalLM, config)
    if kind == "mistral":
        return build_random(
            tmp_path,
            tf.MistralForCausalLM,
            tf.MistralConfig(**SMALL, sliding_window=4096, head_dim=16),
        )
    if kind == "llama-biases":
        config = tf.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True)
        return build_random(tmp_path, tf.LlamaForCausalLM, config)
    if kind == "llama3-rope":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return build_random(
            tmp_path, tf.LlamaForCausalLM, tf.LlamaConfig(**SMALL, rope_parameters=rope)
        )
    if kind == "linear-rope":
        config = tf.LlamaConfig(**SMALL, rope_scaling={"type": "linear", "factor": 2.0})
        return build_random(tmp_path, tf.LlamaForCausalLM, config)
    raise AssertionError(kind)
