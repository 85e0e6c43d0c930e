"""Prometheus metrics of the router, served as text on HTTP /metrics.

Names follow TGI/TGIS (``tgi_`` prefix) so existing dashboards and the
autoscaler (``tgi_queue_size``) work. Where neither has a metric (time to
first token, the gap between tokens, the shards' KV cache blocks) the name
keeps the same prefix and style. Each router owns its registry, so several
routers in one process (tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RouterMetrics:
    """Every metric the router records."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # The *_created series only add noise to every scrape.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_count = Counter(
            "tgi_request_count",
            "Generation requests received, by kind (single, batch, stream) and API (grpc, http, openai)",
            ["kind", "api"],
            registry=r,
        )
        self.request_input_count = Counter(
            "tgi_request_input_count", "Prompts received (a batch request counts each prompt)", registry=r
        )
        self.request_success = Counter(
            "tgi_request_success",
            "Prompts completed, by stop reason, kind of call (single, batch, stream) and API (grpc, http, openai)",
            ["stop_reason", "kind", "api"],
            registry=r,
        )
        self.request_failure = Counter(
            "tgi_request_failure",
            "Prompts that failed, by cause (validation, conc_limit, unavailable, generate, cancelled, stalled) "
            "and API (grpc, http, openai)",
            ["err", "api"],
            registry=r,
        )
        self.request_input_length = Histogram(
            "tgi_request_input_length", "Input tokens per prompt", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens per prompt", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_max_new_tokens = Histogram(
            "tgi_request_max_new_tokens", "max_new_tokens per prompt after validation", buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_total_tokens = Histogram(
            "tgi_request_total_tokens", "Input plus generated tokens per completed prompt", buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_validation_duration = Histogram(
            "tgi_request_validation_duration", "Seconds spent validating and tokenizing a call",
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.request_inference_duration = Histogram(
            "tgi_request_inference_duration", "Seconds from a prompt's prefill to its last token",
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.request_mean_time_per_token_duration = Histogram(
            "tgi_request_mean_time_per_token_duration", "Inference seconds per generated token, per prompt",
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.request_inter_token_duration = Histogram(
            "tgi_request_inter_token_duration", "Seconds between consecutive tokens of one prompt (inter-token latency)",
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.request_duration = Histogram(
            "tgi_request_duration", "Seconds from arrival to last token", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.request_queue_duration = Histogram(
            "tgi_request_queue_duration", "Seconds a prompt waited for its prefill", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.request_first_token_duration = Histogram(
            "tgi_request_first_token_duration", "Seconds from arrival to first token", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.input_tokens = Counter("tgi_input_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("tgi_generated_tokens", "Tokens generated", registry=r)
        self.queue_size = Gauge("tgi_queue_size", "Prompts waiting for a prefill", registry=r)
        self.batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch", registry=r)
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Token budget the running batch holds (input + max_new_tokens)", registry=r
        )
        self.batch_inference_count = Counter(
            "tgi_batch_inference_count", "Shard batch calls, by method (prefill, decode)", ["method"], registry=r
        )
        self.batch_inference_success = Counter(
            "tgi_batch_inference_success", "Successful shard batch calls, by method", ["method"], registry=r
        )
        self.batch_inference_failure = Counter(
            "tgi_batch_inference_failure", "Failed shard batch calls, by method", ["method"], registry=r
        )
        self.batch_inference_duration = Histogram(
            "tgi_batch_inference_duration", "Seconds per shard batch call, by method", ["method"],
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.batch_inference_batch_size = Histogram(
            "tgi_batch_inference_batch_size", "Requests per shard batch call, by method", ["method"],
            buckets=_BATCH_BUCKETS, registry=r,
        )
        self.tokenize_request_count = Counter("tgi_tokenize_request_count", "Tokenize calls", registry=r)
        self.tokenize_request_tokens = Histogram(
            "tgi_tokenize_request_tokens", "Tokens per Tokenize call", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.in_flight = Gauge("tgi_requests_in_flight", "Prompts queued or generating", registry=r)
        self.kv_cache_blocks_used = Gauge(
            "tgi_kv_cache_blocks_used", "KV cache blocks holding tokens on the shards (rank 0)", registry=r
        )
        self.kv_cache_blocks_total = Gauge(
            "tgi_kv_cache_blocks_total", "Usable KV cache blocks on each shard", registry=r
        )
        self.kv_cache_blocks_cached = Gauge(
            "tgi_kv_cache_blocks_cached",
            "KV cache blocks holding a reusable prompt prefix that no request holds (evicted when needed)",
            registry=r,
        )
        self.prefix_cache_prompt_tokens = Counter(
            "tgi_prefix_cache_prompt_tokens",
            "Prompt tokens prefilled (with or without a cached prefix)",
            registry=r,
        )
        self.prefix_cache_reused_tokens = Counter(
            "tgi_prefix_cache_reused_tokens",
            "Prompt tokens whose KV came from the prefix cache instead of being computed",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "tgi_prefix_cache_hits", "Prompts that reused at least one cached prefix block", registry=r
        )
        self.prefix_cache_hit_ratio = Gauge(
            "tgi_prefix_cache_hit_ratio",
            "Share of all prompt tokens prefilled so far that came from the prefix cache",
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
