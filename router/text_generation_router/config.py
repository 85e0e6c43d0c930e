"""Router command line: flags, their environment variables, and the limits derived from them.

Flag names and defaults follow TGI's router (and TGIS where TGIS differs:
gRPC on 8033, HTTP health/metrics on 3000). Every flag also reads an
environment variable so containers can be configured without arguments.
Limits that depend on the model (max input/total tokens) or on the KV cache
(max batch total tokens) are resolved after the shards answer Info and Warmup.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from text_generation_server.utils.argtypes import (
    non_negative_float,
    non_negative_int,
    parse_bool_or_empty,
    port_or_zero,
    positive_float,
    positive_int,
    readable_file,
)

from .tls import TlsConfigError, TlsFiles, tls_files

# TGI caps the default sequence length so a model with a huge context does not
# reserve a huge KV budget per request unless asked to.
DEFAULT_MAX_TOTAL_TOKENS_CAP = 4096
# TGI's default prefill budget leaves a little room above one maximal input.
PREFILL_TOKENS_HEADROOM = 50


class ConfigError(ValueError):
    """A flag value or combination of flags that cannot work; the message names them."""


@dataclass(frozen=True)
class RouterArgs:
    """The router's command line after parsing (values may still be None = from the model)."""

    model_id: str | None = None
    tokenizer: str | None = None
    shard_uds_path: str = "/tmp/text-generation-server/shard"
    grpc_port: int = 8033
    port: int = 3000
    hostname: str = "0.0.0.0"
    max_concurrent_requests: int = 128
    payload_limit: int = 2_000_000
    max_best_of: int = 2
    max_stop_sequences: int = 6
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 20
    waiting_served_ratio: float = 0.3
    max_batch_prefill_tokens: int | None = None
    max_batch_total_tokens: int | None = None
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    default_include_stop_sequence: bool = True
    graceful_shutdown_timeout: float = 10.0
    shard_connect_timeout: float = 120.0
    shard_step_timeout: float = 300.0
    stream_write_timeout: float = 30.0
    max_connections: int = 1024
    json_output: bool = False
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    tls_client_ca_cert_path: str | None = None
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    max_client_batch_size: int = 4

    @property
    def tls(self) -> TlsFiles | None:
        """The TLS files of the public gRPC port, or None for plaintext; ConfigError if they cannot serve."""
        try:
            return tls_files(self.tls_cert_path, self.tls_key_path, self.tls_client_ca_cert_path)
        except TlsConfigError as err:
            raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class Limits:
    """Every limit the router enforces, resolved against the model and the KV cache."""

    max_input_tokens: int
    max_total_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_concurrent_requests: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_waiting_tokens: int
    waiting_served_ratio: float
    max_batch_size: int | None
    block_size: int
    default_include_stop_sequence: bool
    payload_limit: int = 2_000_000  # bytes of text per call
    stream_write_timeout: float = 30.0  # seconds a stream message may wait for the client to take it


# (flags, env vars, type, default, help). Env vars are tried in order.
_FLAGS: list[tuple[tuple[str, ...], tuple[str, ...], Callable[[str], object] | None, object, str]] = [
    (("--model-id",), ("MODEL_ID",), str, None,
     "Name of the served model, reported in logs (any model_id a client sends is accepted)."),
    (("--tokenizer", "--tokenizer-name"), ("TOKENIZER", "TOKENIZER_NAME"), str, None,
     "Local directory holding the tokenizer files (default: --model-id when it is a directory)."),
    (("--shard-uds-path",), ("SHARD_UDS_PATH",), str, "/tmp/text-generation-server/shard",
     "Prefix of the shard sockets; the router connects to {path}-0 and discovers the rest."),
    (("--grpc-port",), ("GRPC_PORT",), port_or_zero, 8033, "Port of the public gRPC API."),
    (("--port",), ("PORT",), port_or_zero, 3000,
     "Port of the HTTP API: TGI's routes, the OpenAI-compatible /v1 routes, /health, /metrics and /docs."),
    (("--hostname",), ("HOSTNAME",), str, "0.0.0.0", "Address to listen on."),
    (("--max-concurrent-requests",), ("MAX_CONCURRENT_REQUESTS",), positive_int, 128,
     "Requests in flight (queued or generating) before new ones get RESOURCE_EXHAUSTED."),
    (("--payload-limit",), ("PAYLOAD_LIMIT",), positive_int, 2_000_000,
     "Bytes of text one call (Generate, GenerateStream, Tokenize) may carry, checked before tokenizing."),
    (("--max-best-of",), ("MAX_BEST_OF",), positive_int, 2,
     "Accepted for TGI compatibility; the TGIS API has no best_of."),
    (("--max-stop-sequences",), ("MAX_STOP_SEQUENCES",), non_negative_int, 6,
     "Stop sequences allowed per request (TGIS clients send up to 6)."),
    (("--max-top-n-tokens",), ("MAX_TOP_N_TOKENS",), non_negative_int, 5,
     "Largest top_n_tokens a request may ask for."),
    (("--max-input-tokens", "--max-input-length"), ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), positive_int, None,
     "Longest input in tokens (default: max-total-tokens - 1)."),
    (("--max-total-tokens",), ("MAX_TOTAL_TOKENS",), positive_int, None,
     "Input plus generated tokens per request (default: min(model max_position_embeddings, 4096))."),
    (("--max-new-tokens",), ("MAX_NEW_TOKENS",), positive_int, 1024,
     "Largest max_new_tokens a request may ask for."),
    (("--default-max-new-tokens",), ("DEFAULT_MAX_NEW_TOKENS",), positive_int, 20,
     "max_new_tokens used when a request leaves it at 0."),
    (("--waiting-served-ratio",), ("WAITING_SERVED_RATIO",), non_negative_float, 0.3,
     "Waiting requests needed, as a fraction of the running batch, to pause decoding for a prefill."),
    (("--max-batch-prefill-tokens",), ("MAX_BATCH_PREFILL_TOKENS",), positive_int, None,
     "Prompt tokens per step (default: max-input-tokens + 50); longer prompts are prefilled in chunks of "
     "this size between the running requests' decode steps."),
    (("--max-batch-total-tokens",), ("MAX_BATCH_TOTAL_TOKENS",), positive_int, None,
     "Tokens the running batch may hold (default: the KV cache capacity Warmup reports)."),
    (("--max-waiting-tokens",), ("MAX_WAITING_TOKENS",), non_negative_int, 20,
     "Decode steps after which waiting requests are admitted regardless of the ratio."),
    (("--max-batch-size",), ("MAX_BATCH_SIZE",), positive_int, None,
     "Largest running batch in requests (default: limited by tokens only)."),
    (("--default-include-stop-sequence",), ("DEFAULT_INCLUDE_STOP_SEQUENCE", "DEFAULT_INCLUDE_STOP_SEQS"), parse_bool_or_empty, True,
     "Keep a matched stop sequence in the output when a request does not say (true/false)."),
    (("--graceful-shutdown-timeout",), ("GRACEFUL_SHUTDOWN_TIMEOUT",), non_negative_float, 10.0,
     "Seconds in-flight requests get to finish after SIGTERM before they are cancelled."),
    (("--shard-connect-timeout",), ("SHARD_CONNECT_TIMEOUT",), non_negative_float, 120.0,
     "Seconds to wait for the first shard socket and its answer at start-up."),
    (("--shard-step-timeout",), ("SHARD_STEP_TIMEOUT",), positive_float, 300.0,
     "Seconds a shard may take for one step (prefill, decode) or health check before it counts as "
     "stuck: health turns NOT_SERVING and the router exits, as for a lost shard."),
    (("--stream-write-timeout",), ("STREAM_WRITE_TIMEOUT",), positive_float, 30.0,
     "Seconds a GenerateStream message may wait for the client to take it; a client that stops reading "
     "longer has its stream cancelled (KV freed, admission slot returned)."),
    (("--max-connections",), ("MAX_CONNECTIONS",), positive_int, 1024,
     "Client connections the gRPC port accepts at once (more are refused at connect), and requests the HTTP "
     "port serves at once (more get 503)."),
    (("--max-client-batch-size",), ("MAX_CLIENT_BATCH_SIZE",), positive_int, 4,
     "Prompts one HTTP /v1/completions request may carry."),
    (("--api-key",), ("API_KEY",), str, None,
     "Require `Authorization: Bearer KEY` on every HTTP route but /health and /metrics (prefer the "
     "API_KEY environment variable: a flag shows in the process list)."),
    (("--cors-allow-origin",), ("CORS_ALLOW_ORIGIN",), str, None,
     "Origins browsers may call the HTTP API from, comma-separated (default: no CORS headers)."),
    (("--json-output",), ("JSON_OUTPUT",), None, False, "Log one JSON object per line."),
    (("--tls-cert-path",), ("TLS_CERT_PATH",), readable_file, None,
     "PEM certificate (chain) of the public gRPC port; with --tls-key-path, serves gRPC over TLS."),
    (("--tls-key-path",), ("TLS_KEY_PATH",), readable_file, None,
     "PEM private key (unencrypted) of --tls-cert-path."),
    (("--tls-client-ca-cert-path",), ("TLS_CLIENT_CA_CERT_PATH",), readable_file, None,
     "PEM CA certificate(s): require clients to present a certificate signed by one (mutual TLS)."),
]


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The router's argparse parser; defaults come from ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="text-generation-router",
        description="Serve the TGIS fmaas.GenerationService gRPC API in front of text-generation-server shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for flags, env_names, kind, default, help_text in _FLAGS:
        dest = flags[0].lstrip("-").replace("-", "_")
        env_value = next((env[name] for name in env_names if name in env), None)
        env_help = f" [env: {', '.join(env_names)}]"
        if kind is None:
            value = default if env_value is None else _parse_env(env_names[0], env_value, parse_bool_or_empty)
            parser.add_argument(
                *flags, dest=dest, nargs="?", const=True, default=value, type=parse_bool_or_empty,
                help=help_text + env_help,
            )
            continue
        value = default if env_value is None else _parse_env(env_names[0], env_value, kind)
        parser.add_argument(*flags, dest=dest, type=kind, default=value, help=help_text + env_help)
    return parser


def _parse_env(name: str, value: str, kind: Callable[[str], object]) -> object:
    try:
        return kind(value)
    except (argparse.ArgumentTypeError, ValueError) as err:
        raise ConfigError(f"environment variable {name}={value!r}: {err}") from None


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> RouterArgs:
    """Parse flags (env vars as defaults) and check what can be checked without the model.

    Raises ConfigError for contradictions; argparse itself exits 2 on malformed flags.
    """
    namespace = build_parser(env).parse_args(argv)
    values = vars(namespace)
    origins = values.pop("cors_allow_origin") or ""
    if values.get("api_key") is not None and not values["api_key"].strip():
        raise ConfigError("--api-key (API_KEY) is empty; set a key or leave it unset")
    args = RouterArgs(**values, cors_allow_origin=tuple(o.strip() for o in origins.split(",") if o.strip()))
    check_static(args)
    return args


def check_static(args: RouterArgs) -> None:
    """Reject flag combinations that cannot work whatever the model is."""
    if args.max_input_tokens is not None and args.max_total_tokens is not None:
        if args.max_input_tokens >= args.max_total_tokens:
            raise ConfigError(
                f"--max-input-tokens ({args.max_input_tokens}) must be < --max-total-tokens "
                f"({args.max_total_tokens}): every request needs room for at least one new token"
            )
    if args.max_batch_total_tokens is not None:
        if args.max_total_tokens is not None and args.max_batch_total_tokens < args.max_total_tokens:
            raise ConfigError(
                f"--max-batch-total-tokens ({args.max_batch_total_tokens}) must be >= "
                f"--max-total-tokens ({args.max_total_tokens}), or one maximal request could never run"
            )
        if args.max_batch_prefill_tokens is not None and args.max_batch_total_tokens < args.max_batch_prefill_tokens:
            raise ConfigError(
                f"--max-batch-prefill-tokens ({args.max_batch_prefill_tokens}) must be <= "
                f"--max-batch-total-tokens ({args.max_batch_total_tokens})"
            )
    if args.default_max_new_tokens > args.max_new_tokens:
        raise ConfigError(
            f"--default-max-new-tokens ({args.default_max_new_tokens}) must be <= "
            f"--max-new-tokens ({args.max_new_tokens})"
        )
    args.tls  # noqa: B018 - loads the files, so a bad one is refused before anything listens
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise ConfigError(f"--tokenizer {args.tokenizer}: not a directory (expected a local tokenizer directory)")


def tokenizer_path(args: RouterArgs) -> Path:
    """Where to load the tokenizer from: --tokenizer, else --model-id when it is a local directory."""
    if args.tokenizer is not None:
        return Path(args.tokenizer)
    if args.model_id is not None and Path(args.model_id).is_dir():
        return Path(args.model_id)
    raise ConfigError(
        "no tokenizer: pass --tokenizer DIR (a local directory with tokenizer files), "
        "or --model-id pointing at a local model directory"
    )


def resolve_sequence_limits(args: RouterArgs, max_position_embeddings: int) -> tuple[int, int, int]:
    """(max_input_tokens, max_total_tokens, max_batch_prefill_tokens) for a model of that context size."""
    if max_position_embeddings <= 1:
        raise ConfigError(f"the shards report max_position_embeddings={max_position_embeddings}; need at least 2")
    if args.max_total_tokens is not None and args.max_total_tokens > max_position_embeddings:
        raise ConfigError(
            f"--max-total-tokens ({args.max_total_tokens}) exceeds the model's "
            f"max_position_embeddings ({max_position_embeddings})"
        )
    if args.max_input_tokens is not None and args.max_input_tokens >= max_position_embeddings:
        raise ConfigError(
            f"--max-input-tokens ({args.max_input_tokens}) must be < the model's "
            f"max_position_embeddings ({max_position_embeddings})"
        )
    if args.max_total_tokens is not None:
        max_total = args.max_total_tokens
    elif args.max_input_tokens is not None:
        max_total = max(min(max_position_embeddings, DEFAULT_MAX_TOTAL_TOKENS_CAP), args.max_input_tokens + 1)
    else:
        max_total = min(max_position_embeddings, DEFAULT_MAX_TOTAL_TOKENS_CAP)
    max_input = args.max_input_tokens if args.max_input_tokens is not None else max_total - 1
    if max_input >= max_total:
        raise ConfigError(
            f"--max-input-tokens ({max_input}) must be < --max-total-tokens ({max_total})"
        )
    # A prompt longer than the prefill budget is prefilled in chunks of at most that many tokens.
    prefill = args.max_batch_prefill_tokens
    if prefill is None:
        prefill = max_input + PREFILL_TOKENS_HEADROOM
    return max_input, max_total, prefill


def resolve_limits(
    args: RouterArgs,
    *,
    max_input_tokens: int,
    max_total_tokens: int,
    max_batch_prefill_tokens: int,
    supported_total_tokens: int,
    block_size: int,
) -> Limits:
    """Final limits once Warmup reported the KV capacity (``supported_total_tokens``)."""
    if args.max_batch_total_tokens is None:
        batch_total = supported_total_tokens
    else:
        batch_total = args.max_batch_total_tokens
        if supported_total_tokens and batch_total > supported_total_tokens:
            raise ConfigError(
                f"--max-batch-total-tokens ({batch_total}) exceeds the KV cache capacity the shards "
                f"reported at warmup ({supported_total_tokens} tokens)"
            )
    if batch_total < max_total_tokens:
        raise ConfigError(
            f"the batch token budget ({batch_total}, --max-batch-total-tokens or the KV cache capacity) "
            f"is below --max-total-tokens ({max_total_tokens}); lower --max-total-tokens or give the "
            f"shards more memory"
        )
    if max_batch_prefill_tokens > batch_total:
        raise ConfigError(
            f"--max-batch-prefill-tokens ({max_batch_prefill_tokens}) must be <= the batch token budget "
            f"({batch_total})"
        )
    return Limits(
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        max_new_tokens=args.max_new_tokens,
        default_max_new_tokens=args.default_max_new_tokens,
        max_stop_sequences=args.max_stop_sequences,
        max_top_n_tokens=args.max_top_n_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        payload_limit=args.payload_limit,
        stream_write_timeout=args.stream_write_timeout,
        max_batch_prefill_tokens=max_batch_prefill_tokens,
        max_batch_total_tokens=batch_total,
        max_waiting_tokens=args.max_waiting_tokens,
        waiting_served_ratio=args.waiting_served_ratio,
        max_batch_size=args.max_batch_size,
        block_size=max(1, block_size),
        default_include_stop_sequence=args.default_include_stop_sequence,
    )
