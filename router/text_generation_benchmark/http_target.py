"""Benchmark a running server through its HTTP API (TGI's ``POST /generate_stream``).

The HTTP twin of :class:`~text_generation_benchmark.server_target.ServerTarget`:
each request is its own server-sent-event stream, all sent at once, and the
arrival of every token event is timed. TGI's parameters have no minimum
length, so a stream may end early at the end-of-sequence token; the timings
cover the tokens that came (per-token gaps and the first token are what the
HTTP path is compared on).
"""

from __future__ import annotations

import asyncio
import json
import time

from text_generation_benchmark.measure import RunMeasurement, Shape, TargetError, from_token_times


class HttpTarget:
    """A router's HTTP API at ``base_url`` (``http://host:port``)."""

    kind = "http"

    def __init__(self, base_url: str, *, request_timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self._session = None  # aiohttp.ClientSession once connected

    async def connect(self) -> None:
        try:
            import aiohttp
        except ImportError:
            raise TargetError("the HTTP target needs aiohttp: pip install aiohttp") from None
        self._aiohttp = aiohttp
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.request_timeout))
        try:
            async with self._session.get(f"{self.base_url}/info") as answer:
                if answer.status != 200:
                    raise TargetError(f"{self.base_url}/info answered {answer.status}: {await answer.text()}")
        except aiohttp.ClientError as err:
            await self.close()
            raise TargetError(f"no HTTP server answered at {self.base_url}: {err}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, shape: Shape, texts: list[str]) -> RunMeasurement:
        """Send ``len(texts)`` streams at once (each prompt cut to its last ``shape.prompt_tokens`` tokens)."""
        if len(texts) != shape.batch_size:
            raise ValueError(f"{len(texts)} prompts for a batch of {shape.batch_size}")
        start = time.perf_counter()
        streams = await asyncio.gather(*(self._stream(text, shape) for text in texts))
        return from_token_times(shape, start, streams)

    async def _stream(self, text: str, shape: Shape) -> list[float]:
        assert self._session is not None, "connect() first"
        body = {"inputs": text, "parameters": {"max_new_tokens": shape.new_tokens, "truncate": shape.prompt_tokens,
                                               "details": True}}
        times: list[float] = []
        try:
            async with self._session.post(f"{self.base_url}/generate_stream", json=body) as answer:
                if answer.status != 200:
                    raise TargetError(f"{self.base_url}/generate_stream answered {answer.status}: {await answer.text()}")
                async for line in answer.content:
                    if not line.startswith(b"data:"):
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise TargetError(f"{self.base_url}/generate_stream: {event['error']}")
                    times.append(now)
                    if event.get("details") is not None and event["details"]["input_length"] != shape.prompt_tokens:
                        raise TargetError(
                            f"the server used {event['details']['input_length']} prompt tokens instead of "
                            f"{shape.prompt_tokens}"
                        )
        except self._aiohttp.ClientError as err:
            raise TargetError(f"{self.base_url}/generate_stream: {err}") from None
        if not times:
            raise TargetError("the server sent no token")
        return times
