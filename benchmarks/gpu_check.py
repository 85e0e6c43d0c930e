"""`make gpu-check`: what a GPU host must show, in one run of a few minutes, as one JSON report.

Sections, each timed; one that fails is recorded with its error and the next one runs:

- ``tests_gpu``: ``pytest tests/gpu``.
- ``kernels``: the 4-bit GPTQ Triton kernel at 7B shapes (4096x4096, 4096->11008, 11008->4096)
  and M = 1, 32, 512 rows, fp16 and bf16 activations: its error against the dequantized weights
  and its time against the dense fp16/bf16 matmul of the same shape (CUDA events, after warm-up).
- ``model``: a small random Llama on the GPU (fp32 and fp16) against the CPU in fp32, prefill and
  decode logits, through the engine's own model code.
- ``nccl``: a one-rank NCCL group (bound to the GPU) all-reducing a tensor.
- ``decode_7b``: a 7B-wide Llama made here (``--layers`` decoder layers of 4096/11008, random
  weights: dense fp16, and random 4-bit GPTQ tensors in the checkpoint layout, group 128) through
  the engine: decode tokens/s at 1 and 32 streams, and the same scaled to 32 layers (decode is
  memory-bound, so time per step grows with the layers).
- ``launcher``: the launcher on the default model on the GPU: seconds to Ready and a greedy
  Generate through the TGIS gRPC API.

    .venv/bin/python benchmarks/gpu_check.py --out gpu-check.json

Without CUDA the report says so and the script exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SHAPES_7B = {"qkv/o 4096x4096": (4096, 4096), "gate/up 4096->11008": (4096, 11008), "down 11008->4096": (11008, 4096)}


def cuda_time(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


# ---------------------------------------------------------------- sections


def section_tests_gpu(args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "gpu")],
        capture_output=True, text=True, timeout=args.section_timeout, cwd=REPO,
    )  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"exit": proc.returncode, "summary": tail, "ok": proc.returncode == 0}


def random_packed(k: int, n: int, group: int, device: torch.device, seed: int = 0):
    """Random 4-bit GPTQ tensors of a ``[n, k]`` layer (checkpoint layout) and their dense weight."""
    from text_generation_server.layers.quant.gptq_kernels.base import GPTQWeights
    from text_generation_server.quantize.packing import dequantize_gptq

    g = torch.Generator().manual_seed(seed)
    groups = k // group
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=g, dtype=torch.int64).to(torch.int32)
    qzeros = torch.full((groups, n // 8), 0x77777777, dtype=torch.int32)  # zero point 8 (stored - 1)
    scales = (torch.rand(groups, n, generator=g) * 0.01 + 0.001).to(torch.float16)
    g_idx = torch.arange(k, dtype=torch.int32) // group
    w = GPTQWeights(qweight.to(device), qzeros.to(device), scales.to(device), g_idx.to(device), 4, "gptq")
    dense = dequantize_gptq(qweight, qzeros, scales, g_idx, 4, "gptq")
    return w, dense


def section_kernels(args) -> dict:
    from text_generation_server.layers.quant.gptq_kernels.triton_kernel import TritonKernel

    device = torch.device("cuda", 0)
    out = {}
    for name, (k, n) in SHAPES_7B.items():
        weights, dense = random_packed(k, n, 128, device)
        why = TritonKernel.unsupported(weights, device)
        if why is not None:
            out[name] = {"unsupported": why}
            continue
        kernel = TritonKernel(weights)
        for dtype in (torch.float16, torch.bfloat16):
            if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                continue
            w = dense.to(device, dtype)
            for m in (1, 32, 512):
                x = torch.randn(m, k, device=device, dtype=dtype)
                got = kernel(x).float()
                want = (x.float() @ dense.to(device).t())
                err = float((got - want).abs().max() / want.abs().max())
                t_q = cuda_time(lambda x=x, kernel=kernel: kernel(x))
                t_d = cuda_time(lambda x=x, w=w: x @ w.t())
                out[f"{name} {str(dtype)[6:]} M={m}"] = {
                    "rel_error": err, "gptq_us": t_q * 1e6, "dense_us": t_d * 1e6, "speedup_vs_dense": t_d / t_q,
                }  # fmt: skip
    return out


def section_attention(args) -> dict:
    """The Triton paged attention against the SDPA path: error and time per decode step at 7B shapes
    (32 heads, 8 KV heads of 128), 32 sequences; and a 4 x 512-token prefill in one launch."""
    from text_generation_server.layers.attention import AttentionMetadata, TorchSDPABackend
    from text_generation_server.layers.triton_attention import paged_attention_decode

    device = torch.device("cuda", 0)
    out = {}
    heads, kv_heads, dim, block = 32, 8, 128, 16
    for context in (512, 2048):
        batch = 32
        blocks = context // block
        tables = torch.randperm(batch * blocks, device=device).view(batch, blocks) + 1
        k_cache = torch.randn(batch * blocks + 1, block, kv_heads, dim, device=device, dtype=torch.float16)
        v_cache = torch.randn_like(k_cache)
        q = torch.randn(batch, heads, dim, device=device, dtype=torch.float16)
        lens = torch.full((batch,), context, device=device)
        attn = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long, device=device),
                                 block_tables=tables, context_lens=lens, query_lens=[1] * batch)
        sdpa = TorchSDPABackend()
        want = sdpa._decode(q, k_cache, v_cache, attn, dim ** -0.5, rows=None).float()
        got = paged_attention_decode(q, k_cache, v_cache, tables, lens, dim ** -0.5).float()
        args_ = (q, k_cache, v_cache)
        t_triton = cuda_time(lambda a=args_, t=tables, n=lens: paged_attention_decode(*a, t, n, dim ** -0.5))
        t_sdpa = cuda_time(lambda a=args_, m=attn, s=sdpa: s._decode(*a, m, dim ** -0.5, rows=None))
        out[f"decode 32 seqs x {context} tokens"] = {
            "rel_error": float((got - want).abs().max() / want.abs().max()),
            "triton_us": t_triton * 1e6, "sdpa_gather_us": t_sdpa * 1e6, "speedup": t_sdpa / t_triton,
        }  # fmt: skip
    # Prefill: 4 prompts of 512 tokens in one step (varlen kernel against SDPA, one call per sequence).
    from text_generation_server.layers.triton_attention import paged_attention_varlen

    seqs, n = 4, 512
    blocks = n // block
    tables = torch.arange(seqs * blocks, device=device).view(seqs, blocks) + 1
    k_cache = torch.randn(seqs * blocks + 1, block, kv_heads, dim, device=device, dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(seqs * n, heads, dim, device=device, dtype=torch.float16)
    k = torch.randn(seqs * n, kv_heads, dim, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    slots = (tables[:, :, None] * block + torch.arange(block, device=device)).reshape(-1)
    lens = torch.full((seqs,), n, device=device)
    attn = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=lens, query_lens=[n] * seqs)
    sdpa = TorchSDPABackend()
    want = sdpa.forward(q, k, v, k_cache, v_cache, attn, dim ** -0.5).float()
    got = paged_attention_varlen(q, k_cache, v_cache, tables, lens, [n] * seqs, dim ** -0.5).float()
    t_triton = cuda_time(lambda: paged_attention_varlen(q, k_cache, v_cache, tables, lens, [n] * seqs, dim ** -0.5))
    t_sdpa = cuda_time(lambda: sdpa.forward(q, k, v, k_cache, v_cache, attn, dim ** -0.5))
    out[f"prefill {seqs} x {n} tokens"] = {
        "rel_error": float((got - want).abs().max() / want.abs().max()),
        "triton_us": t_triton * 1e6, "sdpa_per_sequence_us": t_sdpa * 1e6, "speedup": t_sdpa / t_triton,
    }  # fmt: skip
    return out


def build_llama(path: Path, *, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int,
                dtype: str) -> Path:  # fmt: skip
    """A random Llama checkpoint written straight from tensors (no transformers model built)."""
    from safetensors.torch import save_file
    from tiny_model import build_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path, vocab_size=min(vocab, 384))
    head_dim = hidden // heads
    g = torch.Generator().manual_seed(0)
    t = getattr(torch, dtype)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(t)

    tensors = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=t),
               "lm_head.weight": rnd(vocab, hidden)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": rnd(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rnd(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rnd(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rnd(inter, hidden),
            p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=t),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=t),
        }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


def gptq_twin(dense_dir: Path, out: Path, group: int = 128) -> Path:
    """``dense_dir``'s Llama with every decoder linear as random 4-bit GPTQ tensors (checkpoint layout)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in dense_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(dense_dir / "model.safetensors"))
    packed = {}
    for i, (name, t) in enumerate(tensors.items()):
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            n, k = t.shape
            w, _ = random_packed(k, n, group, torch.device("cpu"), seed=i)
            stem = name.removesuffix(".weight")
            packed |= {f"{stem}.qweight": w.qweight, f"{stem}.qzeros": w.qzeros, f"{stem}.scales": w.scales,
                       f"{stem}.g_idx": w.g_idx}  # fmt: skip
        else:
            packed[name] = t
    save_file(packed, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                     "sym": True, "checkpoint_format": "gptq"}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def section_model(args) -> dict:
    from paged_runner import PagedRunner
    from text_generation_server.distributed import init_distributed
    from text_generation_server.models import load_model

    path = build_llama(Path(args.work) / "small-llama", hidden=256, inter=512, layers=2, heads=8, kv_heads=4,
                       vocab=384, dtype="float32")  # fmt: skip
    ids = torch.randint(3, 384, (24,), generator=torch.Generator().manual_seed(1)).tolist()

    def logits(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        model = load_model(path, dtype=dtype, device=device, dist=init_distributed(0, 1))
        runner = PagedRunner(model, block_size=16)
        out = [runner.step([("a", ids[:16])])[0]] + [runner.step([("a", [t])])[0] for t in ids[16:]]
        return torch.cat(out).float().cpu(), model.plan.name

    ref, cpu_plan = logits(torch.device("cpu"), torch.float32)
    result = {"cpu_plan": cpu_plan}
    for dtype in (torch.float32, torch.float16):
        got, plan = logits(torch.device("cuda", 0), dtype)
        result[str(dtype)[6:]] = {"plan": plan, "max_abs_diff": float((got - ref).abs().max()),
                                  "rel_norm_diff": float((got - ref).norm() / ref.norm())}  # fmt: skip
    return result


def section_nccl(args) -> dict:
    import torch.distributed as tdist

    store = tdist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    device = torch.device("cuda", 0)
    tdist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
    try:
        x = torch.arange(1 << 20, device=device, dtype=torch.float32)
        tdist.all_reduce(x)
        torch.cuda.synchronize()
        ok = bool(torch.equal(x.cpu(), torch.arange(1 << 20, dtype=torch.float32)))
        seconds = cuda_time(lambda: tdist.all_reduce(x), warmup=3, iters=10)
    finally:
        tdist.destroy_process_group()
    return {"ok": ok, "all_reduce_4MiB_us": seconds * 1e6}


def decode_rate(path: Path, quantize: str | None, streams: int, steps: int) -> float:
    """Tokens/s of the engine's decode steps over ``streams`` sequences on cuda:0."""
    from text_generation_server.distributed import init_distributed
    from text_generation_server.engine import Generator
    from text_generation_server.models import load_model

    sys.path.insert(0, str(REPO / "benchmarks"))
    from profile_decode import decode_steps

    model = load_model(path, dtype=torch.float16, device=torch.device("cuda", 0), dist=init_distributed(0, 1),
                       quantize=quantize)  # fmt: skip
    gen = Generator(model, init_distributed(0, 1))
    decode_steps(gen, streams, 32, 4, 1)  # warm-up
    times = sorted(decode_steps(gen, streams, 32, steps, 2))
    del gen, model
    torch.cuda.empty_cache()
    return streams / times[len(times) // 2]


def section_decode_7b(args) -> dict:
    work = Path(args.work)
    t0 = time.perf_counter()
    dense = build_llama(work / "llama-7b-wide", hidden=4096, inter=11008, layers=args.layers, heads=32, kv_heads=32,
                        vocab=32000, dtype="float16")  # fmt: skip
    gptq = gptq_twin(dense, work / "llama-7b-wide-gptq")
    result = {"layers": args.layers, "build_s": time.perf_counter() - t0}
    scale = args.layers / 32
    for name, path, quantize in (("fp16", dense, None), ("gptq-4bit", gptq, "gptq")):
        for streams in (1, 32):
            rate = decode_rate(path, quantize, streams, args.steps)
            result[f"{name} {streams} streams tok/s"] = rate
            result[f"{name} {streams} streams tok/s at 32 layers"] = rate * scale
    for streams in (1, 32):
        result[f"gptq/fp16 {streams} streams"] = (
            result[f"gptq-4bit {streams} streams tok/s"] / result[f"fp16 {streams} streams tok/s"])
    return result


def section_launcher(args) -> dict:
    sys.path.insert(0, str(REPO))
    from tests.e2e.conftest import ServerProcess

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-launch-", dir=args.work))
    t0 = time.perf_counter()
    server = ServerProcess(tmp, []).start(timeout=args.section_timeout)
    ready = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        answer = server.greedy(["The capital of France is"], 64, 1, timeout=120)
        seconds = time.perf_counter() - t1
        log = server.log_path.read_text(errors="replace")
    finally:
        code = server.stop()
    plan = next((line.split("Execution plan: ", 1)[1][:160] for line in log.splitlines() if "Execution plan: " in line),
                None)  # fmt: skip
    return {"ready_s": ready, "generate_64_tokens_s": seconds, "tokens_per_s": len(answer.tokens[0]) / seconds,
            "text": "".join(answer.tokens[0])[:200], "exit": code, "plan": plan}  # fmt: skip


SECTIONS = {
    "tests_gpu": section_tests_gpu,
    "kernels": section_kernels,
    "attention": section_attention,
    "model": section_model,
    "nccl": section_nccl,
    "decode_7b": section_decode_7b,
    "launcher": section_launcher,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    p.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections only")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B-wide model (default 8)")
    p.add_argument("--steps", type=int, default=32, help="measured decode steps per rate (default 32)")
    p.add_argument("--section-timeout", type=float, default=300.0)
    p.add_argument("--work", default=None, help="scratch directory (default: a fresh temporary one)")
    args = p.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="gpu-check-")
    report: dict = {
        "host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    if not torch.cuda.is_available():
        report["error"] = "no CUDA device on this host: nothing to check"
        args.out.write_text(json.dumps(report, indent=2))
        print(report["error"])
        return 2
    report["gpu"] = torch.cuda.get_device_name(0)
    report["gpus"] = torch.cuda.device_count()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    failed = False
    for name, fn in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            report[name] = fn(args)
        except Exception as error:  # noqa: BLE001 - recorded, and the next section runs
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
            failed = True
        report[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"{name}: {report[name + '_seconds']} s: {json.dumps(report[name], default=str)[:600]}", flush=True)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.write_text(json.dumps(report, indent=2, default=str))
    return 1 if failed or (report.get("tests_gpu", {}).get("ok") is False) else 0


if __name__ == "__main__":
    sys.exit(main())
