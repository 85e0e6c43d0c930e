"""`make bench`: our server against its peers, in one run and one process tree, as ratios.

Starts our server (the launcher, default model, dense in float32, bfloat16
and float16; and a GPTQ 4-bit row when a GPTQ checkpoint of the default model
can be had), loads the peers (transformers fp32 ``generate`` always; llama.cpp
on the model's Q4_1 GGUF and on a float16 GGUF of it when llama-cpp-python is
installed; 4-bit rows are held against the first, dense rows against the
second), warms every contestant up, then in each
round measures every contestant the same way on the same prompts with the
same CPU threads:

- single-stream decode tokens/s (our server through the full gRPC path);
- total generated tokens/s of N concurrent streams (static batching for
  transformers, one multi-sequence batch for llama.cpp);
- time to first token for a long prompt;
- our per-token time through gRPC + router versus the shard's Decode
  called directly (the server overhead);
- our single-stream per-token time and time to first token through the
  HTTP API (/generate_stream) against the same through gRPC.

Timings on a shared host vary several-fold, so only ratios taken within a
round are compared, and the load average is printed with them. Results go
to benchmarks/results/<timestamp>.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger
from text_generation_benchmark.measure import TargetError

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_ours import Launcher, LaunchError, OurServer  # noqa: E402
from bench_peers import (  # noqa: E402
    LlamaCppPeer,
    TransformersPeer,
    llama_cpp_f16_gguf,
    llama_cpp_repack_runs,
    llama_cpp_unavailable,
)
from bench_prompts import PromptBook  # noqa: E402
from bench_report import Contestant, floors, ratios, summary_text, write_chart, write_json  # noqa: E402

DENSE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DENSE_WEIGHTS = {"fp32": "fp32", "bf16": "16bit", "fp16": "16bit"}
GPTQ_CACHE = REPO / ".cache" / "bench" / "SmolLM2-135M-Instruct-gptq-4bit-g64"
# g64: the default model is 576 wide, which groups of 128 do not divide.
QUANTIZE_ARGS = ["--bits", "4", "--groupsize", "64", "--nsamples", "128", "--seqlen", "512"]


def _dense_list(value: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in DENSE_DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dense dtype {', '.join(unknown)}; choose from fp32, bf16, fp16")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every contestant (default 2)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per stream (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length of the decode runs (default 32)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    p.add_argument("--ttft-prompt-tokens", type=int, default=512, help="prompt length for TTFT (default 512)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds; medians are reported (default 3)")
    p.add_argument("--quick", action="store_true", help="a short check that everything runs: 16 new tokens, 1 round")
    p.add_argument("--gptq", default="auto", metavar="auto|off|DIR",
                   help=f"GPTQ row: auto = the cached checkpoint {GPTQ_CACHE.relative_to(REPO)}, made once with "
                        f"`text-generation-server quantize` when missing; off; or a GPTQ checkpoint directory")
    p.add_argument("--dense", default="fp32,bf16,fp16", type=_dense_list, metavar="LIST",
                   help="dtypes of our dense rows, comma-separated from fp32, bf16, fp16 (default all three)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peers")
    p.add_argument("--results-dir", type=Path, default=HERE / "results", help="where JSON and PNG go")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a server to come up")
    return p


# ---- contestants ---------------------------------------------------------------------------


def gptq_checkpoint(option: str, workdir: Path, threads: int) -> tuple[Path | None, str | None]:
    """The GPTQ checkpoint to serve, or None and why there is none."""
    if option == "off":
        return None, "skipped (--gptq off)"
    try:
        from text_generation_server.layers.quant.registry import supported_quantizations
    except ImportError as err:
        return None, f"the quantization registry does not import: {err}"
    if "gptq" not in supported_quantizations():
        return None, f"this build has no --quantize gptq (supported: {', '.join(supported_quantizations()) or 'none'})"
    if option != "auto":
        path = Path(option)
        if not (path / "quantize_config.json").is_file() and not (path / "config.json").is_file():
            return None, f"--gptq {path}: not a checkpoint directory (no quantize_config.json or config.json)"
        return path, None
    if (GPTQ_CACHE / "quantize_config.json").is_file() and any(GPTQ_CACHE.glob("*.safetensors")):
        return GPTQ_CACHE, None
    return quantize_default_model(workdir, threads)


def quantize_default_model(workdir: Path, threads: int) -> tuple[Path | None, str | None]:
    """Make the GPTQ checkpoint once (minutes) and cache it; None and why when the quantizer fails."""
    server = Path(sys.executable).parent / "text-generation-server"
    tmp = GPTQ_CACHE.with_name(GPTQ_CACHE.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no .cache/bench yet
    log = workdir / "quantize.log"
    cmd = [str(server), "quantize", "default", str(tmp), *QUANTIZE_ARGS]
    logger.info(f"No cached GPTQ checkpoint; quantizing the default model once ({' '.join(QUANTIZE_ARGS)}), "
                f"log {log}; later runs reuse {GPTQ_CACHE}")
    started = time.perf_counter()
    with open(log, "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)}).returncode
    if rc != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        return None, f"the quantizer exited with {rc}: {(lines or ['(no output)'])[-1][-300:]} (log: {log})"
    shutil.rmtree(GPTQ_CACHE, ignore_errors=True)
    tmp.rename(GPTQ_CACHE)
    logger.info(f"GPTQ checkpoint written to {GPTQ_CACHE} in {time.perf_counter() - started:.0f} s")
    return GPTQ_CACHE, None


async def start_ours(name: str, args: list[str], workdir: Path, opts, row: Contestant) -> OurServer | None:
    launcher = Launcher(name, args, workdir, opts.threads)
    logger.info(f"Starting our server ({row.name}): {' '.join(launcher.cmd[1:])}")
    started = time.perf_counter()
    try:
        launcher.start(opts.startup_timeout)
    except LaunchError as err:
        row.why_unavailable = f"the server did not start: {err}"
        return None
    ours = OurServer(launcher)
    try:
        await ours.connect()
    except TargetError as err:
        launcher.stop()
        row.why_unavailable = f"the server started but does not answer: {err}"
        return None
    row.info = {**ours.describe(), "startup_s": round(time.perf_counter() - started, 1)}
    return ours


# ---- measuring -----------------------------------------------------------------------------


async def measure_round(contestants, prompts, long_prompts, opts, warmup: bool) -> None:
    """Every available contestant, the same three figures (plus the overhead pair for ours), on
    this round's prompts: ``prompts`` for the streams, ``long_prompts`` (two, each prefilled
    once: ours by gRPC and by HTTP, the peers the first) for time to first token.

    A contestant that fails is reported unavailable with the error and left out of later rounds.
    """
    for i, (row, impl) in enumerate(contestants):
        if impl is None:
            continue
        logger.info(f"{'Warming up' if warmup else 'Measuring'} {row.name}")
        try:
            await measure_one(row, impl, prompts, long_prompts, opts, warmup)
        except (TargetError, RuntimeError, ValueError) as err:
            logger.error(f"{row.name} failed: {err}")
            row.why_unavailable = f"failed while measuring: {err}"
            contestants[i] = (row, None)


async def measure_one(row: Contestant, impl, prompts, long_prompts, opts, warmup: bool) -> None:
    n = 8 if warmup else opts.new_tokens
    batch = prompts[: opts.streams]
    if isinstance(impl, OurServer):
        grpc_gaps = await impl.single_stream_times(prompts[0], n)
        http_gaps = await impl.http_single_stream_times(prompts[0], n)
        shard_gaps = await impl.shard_decode_times(prompts[0], n)
        batched = await impl.batched(batch, 4 if warmup else n)
        ttft = await impl.ttft(long_prompts[0])
        http_ttft = await impl.http_ttft(long_prompts[1])
        if warmup:
            return
        grpc_ms = 1e3 * sum(grpc_gaps) / len(grpc_gaps)
        shard_ms = 1e3 * sum(shard_gaps) / len(shard_gaps)
        row.single_stream_tok_s.append(1e3 / grpc_ms)
        row.grpc_per_token_ms.append(grpc_ms)
        row.shard_per_token_ms.append(shard_ms)
        if http_gaps:  # TGI's API has no minimum length: a stream ending at its first token has no gap
            row.http_per_token_ms.append(1e3 * sum(http_gaps) / len(http_gaps))
        row.http_ttft_s.append(http_ttft)
    else:
        single = impl.single_stream(prompts[0].ids, n)
        batched = impl.batched([p.ids for p in batch], 4 if warmup else n)
        ttft = impl.ttft(long_prompts[0].ids)
        if warmup:
            return
        row.single_stream_tok_s.append(single)
    row.batched_tok_s.append(batched)
    row.ttft_s.append(ttft)


def host_facts() -> dict:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    return {
        "cores": cores,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_instructions": any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")),
        "torch": torch.__version__,
    }


async def run(opts) -> int:
    from text_generation_server.model_source import resolve_model

    started_at = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    load_start = [round(x, 2) for x in os.getloadavg()]
    workdir = Path(tempfile.mkdtemp(prefix="tgi-bench-"))
    checkpoint = resolve_model(None, None)
    logger.info(f"Default model checkpoint {checkpoint}; logs and sockets under {workdir}")
    book = PromptBook(checkpoint)
    # Every round (the warm-up too) gets prompts of its own, the same for every contestant: our
    # server's prefix cache would otherwise serve a repeated prompt's prefill from memory, and
    # time to first token and the 16 streams' prefills are meant cold.
    rounds = opts.rounds + 1
    short = book.prompts(opts.streams * rounds, opts.prompt_tokens)
    prompt_sets = [short[r * opts.streams : (r + 1) * opts.streams] for r in range(rounds)]
    long = book.prompts(2 * rounds, opts.ttft_prompt_tokens)
    long_pairs = [(long[2 * r], long[2 * r + 1]) for r in range(rounds)]

    rows: list[Contestant] = []
    contestants: list[tuple[Contestant, object]] = []
    servers: list[OurServer] = []
    try:
        # The dense model in each dtype (the default launch serves one of the 16-bit forms).
        for dtype in opts.dense:
            row = Contestant(f"ours_{dtype}", f"ours {dtype}", ours=True, weights=DENSE_WEIGHTS[dtype])
            server = await start_ours(dtype, ["--dtype", DENSE_DTYPES[dtype]], workdir, opts, row)
            rows.append(row)
            contestants.append((row, server))
            if server:
                servers.append(server)

        gptq = Contestant("ours_gptq", "ours GPTQ 4-bit", ours=True, weights="4bit")
        rows.append(gptq)
        path, why = gptq_checkpoint(opts.gptq, workdir, opts.threads)
        server = None
        if path is None:
            gptq.why_unavailable = why
        else:
            server = await start_ours("gptq", ["--model-id", str(path), "--quantize", "gptq"], workdir, opts, gptq)
            if server:
                servers.append(server)
        contestants.append((gptq, server))

        tf = Contestant("transformers", "transformers fp32", ours=False, weights="fp32")
        peer = TransformersPeer(checkpoint, opts.threads)
        tf.info = {"version": peer.version, "batching": "static"}
        rows.append(tf)
        contestants.append((tf, peer))

        lc = Contestant("llama_cpp", "llama.cpp Q4_1", ours=False, weights="4bit")
        why = "skipped (--no-llama-cpp)" if opts.no_llama_cpp else llama_cpp_unavailable()
        lpeer = None
        if why:
            lc.why_unavailable = why
        else:
            repack, seen = llama_cpp_repack_runs()
            if not repack:
                logger.warning(f"llama.cpp crashes in its repacked (AMX/AVX-512) weight buffers on this CPU ({seen}); "
                               f"measuring it without them")
            lpeer = LlamaCppPeer(opts.threads, max_context=opts.ttft_prompt_tokens + opts.new_tokens + 64,
                                 repack=repack)
            lc.name = lpeer.name
            lc.info = {"version": lpeer.version, "batching": "one multi-sequence batch",
                       "repacked_weights": repack if repack else f"off: {seen}"}
        rows.append(lc)
        contestants.append((lc, lpeer))

        # The dense rows' peer: llama.cpp on a float16 GGUF of the same weights.
        f16 = Contestant("llama_cpp_f16", "llama.cpp F16", ours=False, weights="16bit")
        fpeer = None
        if why:
            f16.why_unavailable = why
        else:
            path, f16.why_unavailable = llama_cpp_f16_gguf(REPO / ".cache" / "bench")
            if path is not None:
                fpeer = LlamaCppPeer(opts.threads, max_context=opts.ttft_prompt_tokens + opts.new_tokens + 64,
                                     repack=repack, gguf=path, name="llama.cpp F16")
                f16.name = fpeer.name
                f16.info = {"version": fpeer.version, "batching": "one multi-sequence batch",
                            "gguf": f"{path.name}, llama.cpp's float16 requantization of the Q4_1 file"}
        rows.append(f16)
        contestants.append((f16, fpeer))

        await measure_round(contestants, prompt_sets[0], long_pairs[0], opts, warmup=True)
        for r in range(opts.rounds):
            logger.info(f"Round {r + 1}/{opts.rounds}; load average {os.getloadavg()[0]:.2f}")
            await measure_round(contestants, prompt_sets[r + 1], long_pairs[r + 1], opts, warmup=False)
    finally:
        for server in servers:
            await server.close()
            server.launcher.stop()

    meta = {
        "started_at": started_at,
        "settings": {"threads": opts.threads, "new_tokens": opts.new_tokens, "prompt_tokens": opts.prompt_tokens,
                     "streams": opts.streams, "ttft_prompt_tokens": opts.ttft_prompt_tokens, "rounds": opts.rounds},
        "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "host": host_facts(),
        "model": str(checkpoint),
    }
    rs = ratios(rows, opts.streams, opts.ttft_prompt_tokens)
    fl = floors(rows)
    print(summary_text(rows, rs, fl, meta))
    json_path = opts.results_dir / f"{started_at}.json"
    write_json(json_path, rows, rs, fl, meta)
    png_path = json_path.with_suffix(".png")
    chart = write_chart(png_path, rows, meta)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if chart else ""))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from text_generation_server.utils.log import setup_logging

    opts = build_parser().parse_args(argv)
    if opts.quick:
        opts.new_tokens, opts.rounds = min(opts.new_tokens, 16), 1
    for name in ("threads", "new_tokens", "prompt_tokens", "streams", "ttft_prompt_tokens", "rounds"):
        if getattr(opts, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if opts.new_tokens < 2:
        print("--new-tokens must be at least 2 (a decode rate needs two tokens)", file=sys.stderr)
        return 2
    setup_logging("bench")
    try:
        return asyncio.run(run(opts))
    except KeyboardInterrupt:
        logger.info("Interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
