"""What one benchmark run measures, and the metrics derived from it.

A run sends one batch of ``batch_size`` requests, each with a prompt of
``prompt_tokens`` tokens, and has every request generate exactly
``new_tokens`` tokens. Times are wall-clock seconds seen by the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from text_generation_benchmark.stats import Summary


class TargetError(RuntimeError):
    """The target cannot be reached or refused the benchmark; the message says what to do."""


@dataclass(frozen=True)
class Shape:
    """One point of the sweep."""

    batch_size: int
    prompt_tokens: int
    new_tokens: int

    def to_dict(self) -> dict[str, int]:
        return {
            "batch_size": self.batch_size,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
        }


@dataclass
class RunMeasurement:
    """Timings of one run of one :class:`Shape`.

    ``prefill_s``: from sending the batch until every request has its first
    token. ``ttft_s``: per request, from sending it until its first token.
    ``inter_token_s``: every gap between consecutive tokens of a request.
    ``total_s``: from sending the batch until the last token of the last request.
    """

    shape: Shape
    prefill_s: float
    ttft_s: list[float]
    inter_token_s: list[float]
    total_s: float
    generated_tokens: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.shape.batch_size * self.shape.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after each request's first, over the time after the prefill; None without any."""
        decoded = self.generated_tokens - self.shape.batch_size
        decode_s = self.total_s - self.prefill_s
        if decoded <= 0 or decode_s <= 0:
            return None
        return decoded / decode_s

    @property
    def total_tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s


def from_token_times(shape: Shape, start: float, streams: list[list[float]]) -> RunMeasurement:
    """The measurement of concurrent streams sent at ``start``, from each token's arrival time."""
    ttft = [times[0] - start for times in streams]
    gaps = [b - a for times in streams for a, b in zip(times, times[1:], strict=False)]
    return RunMeasurement(
        shape=shape,
        prefill_s=max(ttft),
        ttft_s=ttft,
        inter_token_s=gaps,
        total_s=max(times[-1] for times in streams) - start,
        generated_tokens=sum(len(times) for times in streams),
    )


# (key in JSON, label in the table, unit, scale from seconds or tokens/s)
METRICS: tuple[tuple[str, str, str, float], ...] = (
    ("prefill_latency_ms", "prefill latency", "ms", 1e3),
    ("ttft_ms", "time to first token", "ms", 1e3),
    ("inter_token_latency_ms", "inter-token latency", "ms", 1e3),
    ("prefill_tokens_per_s", "prefill throughput", "tok/s", 1.0),
    ("decode_tokens_per_s", "decode throughput", "tok/s", 1.0),
    ("total_tokens_per_s", "generated tokens/s", "tok/s", 1.0),
)


def summarize(runs: list[RunMeasurement]) -> dict[str, Summary | None]:
    """Each metric of :data:`METRICS` over ``runs`` (None where it does not apply)."""
    values: dict[str, list[float]] = {key: [] for key, *_ in METRICS}
    for run in runs:
        values["prefill_latency_ms"].append(run.prefill_s * 1e3)
        values["ttft_ms"].extend(t * 1e3 for t in run.ttft_s)
        values["inter_token_latency_ms"].extend(t * 1e3 for t in run.inter_token_s)
        values["prefill_tokens_per_s"].append(run.prefill_tokens_per_s)
        decode = run.decode_tokens_per_s
        if decode is not None:
            values["decode_tokens_per_s"].append(decode)
        values["total_tokens_per_s"].append(run.total_tokens_per_s)
    return {key: Summary.of(v) for key, v in values.items()}
