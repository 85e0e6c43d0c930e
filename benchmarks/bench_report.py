"""`make bench` results: ratios against the issue's targets, a printed summary, JSON and a PNG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

# Memory-bandwidth floors for one decode step of the default model on this kind of host.
FLOOR_TOK_S = {"fp32": 80.0, "16bit": 160.0, "int8": 320.0, "4bit": 640.0}
# Which llama.cpp peer each of our weight formats is held against: 4-bit rows against its 4-bit
# GGUF, dense rows against its float16 one.
LLAMA_CPP_PEER = {"4bit": "llama_cpp", "int8": "llama_cpp", "fp32": "llama_cpp_f16", "16bit": "llama_cpp_f16"}


@dataclass
class Contestant:
    """One row: our server in one configuration, or a peer."""

    key: str
    name: str
    ours: bool
    weights: str  # "fp32", "16bit", "int8" or "4bit": which memory-bandwidth floor applies
    why_unavailable: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    single_stream_tok_s: list[float] = field(default_factory=list)
    batched_tok_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    grpc_per_token_ms: list[float] = field(default_factory=list)
    shard_per_token_ms: list[float] = field(default_factory=list)
    http_per_token_ms: list[float] = field(default_factory=list)
    http_ttft_s: list[float] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.why_unavailable is None

    def median(self, name: str) -> float | None:
        values = getattr(self, name)
        return statistics.median(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        figures = ("single_stream_tok_s", "batched_tok_s", "ttft_s", "grpc_per_token_ms", "shard_per_token_ms",
                   "http_per_token_ms", "http_ttft_s")
        return {
            "name": self.name,
            "ours": self.ours,
            "weights": self.weights,
            "available": self.available,
            "why_unavailable": self.why_unavailable,
            "info": self.info,
            "median": {f: self.median(f) for f in figures},
            "per_round": {f: getattr(self, f) for f in figures},
        }


@dataclass
class Ratio:
    name: str
    values: list[float]  # one per round
    target: str  # e.g. ">= 4"
    bound: float
    higher_is_better: bool

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "per_round": self.values, "target": self.target,
                "met": self.met}


def _per_round(a: list[float], b: list[float], fn) -> list[float]:
    return [fn(x, y) for x, y in zip(a, b, strict=False)]


def ratios(rows: list[Contestant], streams: int, ttft_tokens: int) -> list[Ratio]:
    """The issue's targets, for each of our available rows against each available peer (per round)."""
    peers = {c.key: c for c in rows if not c.ours and c.available}
    tf = peers.get("transformers")
    out: list[Ratio] = []
    for ours in (c for c in rows if c.ours and c.available):
        div = lambda x, y: x / y  # noqa: E731
        lc = peers.get(LLAMA_CPP_PEER[ours.weights])
        if tf:
            out.append(Ratio(f"single-stream decode: {ours.name} / {tf.name}",
                             _per_round(ours.single_stream_tok_s, tf.single_stream_tok_s, div), ">= 4", 4.0, True))
        if lc:
            out.append(Ratio(f"single-stream decode: {ours.name} / {lc.name}",
                             _per_round(ours.single_stream_tok_s, lc.single_stream_tok_s, div), ">= 1", 1.0, True))
            out.append(Ratio(f"{streams} streams total tok/s: {ours.name} / {lc.name} batched",
                             _per_round(ours.batched_tok_s, lc.batched_tok_s, div), ">= 1.5", 1.5, True))
        if tf:
            out.append(Ratio(f"{streams} streams total tok/s: {ours.name} / {tf.name} static batch",
                             _per_round(ours.batched_tok_s, tf.batched_tok_s, div), ">= 2", 2.0, True))
            out.append(Ratio(f"TTFT {ttft_tokens}-token prompt: {ours.name} / {tf.name}",
                             _per_round(ours.ttft_s, tf.ttft_s, div), "<= 0.5", 0.5, False))
        if ours.grpc_per_token_ms and ours.shard_per_token_ms:
            out.append(Ratio(f"server overhead (gRPC+router vs shard Decode): {ours.name}",
                             _per_round(ours.grpc_per_token_ms, ours.shard_per_token_ms, lambda g, s: g / s - 1),
                             "< 0.10", 0.10, False))
        if len(ours.http_per_token_ms) == len(ours.grpc_per_token_ms) and ours.http_per_token_ms:
            out.append(Ratio(f"single-stream tok/s, HTTP / gRPC: {ours.name}",
                             _per_round(ours.grpc_per_token_ms, ours.http_per_token_ms, lambda g, h: g / h),
                             ">= 0.95", 0.95, True))
        if len(ours.http_ttft_s) == len(ours.ttft_s) and ours.http_ttft_s:
            out.append(Ratio(f"TTFT {ttft_tokens}-token prompt, HTTP / gRPC: {ours.name}",
                             _per_round(ours.http_ttft_s, ours.ttft_s, div), "<= 1.05", 1.05, False))
    return out


def floors(rows: list[Contestant]) -> list[dict[str, Any]]:
    """How far each single-stream figure is from the memory-bandwidth floor of its weight format."""
    out = []
    for c in rows:
        rate = c.median("single_stream_tok_s")
        if rate is None:
            continue
        floor = FLOOR_TOK_S[c.weights]
        out.append({"name": c.name, "single_stream_tok_s": rate, "weights": c.weights, "floor_tok_s": floor,
                    "fraction_of_floor": rate / floor})
    return out


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.0f} ms" if unit == "s" else f"{value:.1f} {unit}"


def summary_text(rows: list[Contestant], rs: list[Ratio], fl: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    s = meta["settings"]
    lines = [
        f"make bench: {s['threads']} CPU threads, {s['new_tokens']} new tokens, {s['prompt_tokens']}-token prompts, "
        f"{s['streams']} streams, {s['rounds']} rounds (medians; ratios taken within each round)",
        "",
        f"{'contestant':<28} {'1 stream':>14} {str(s['streams']) + ' streams':>14} "
        f"{'TTFT ' + str(s['ttft_prompt_tokens']):>10} {'per token gRPC/shard':>22}",
    ]
    for c in rows:
        if not c.available:
            lines.append(f"{c.name:<28} unavailable: {c.why_unavailable}")
            continue
        g, sh = c.median("grpc_per_token_ms"), c.median("shard_per_token_ms")
        per_token = f"{g:.1f} / {sh:.1f} ms" if g is not None and sh is not None else "-"
        lines.append(
            f"{c.name:<28} {_fmt(c.median('single_stream_tok_s'), 'tok/s'):>14} "
            f"{_fmt(c.median('batched_tok_s'), 'tok/s'):>14} {_fmt(c.median('ttft_s'), 's'):>10} {per_token:>22}"
        )
    lines += ["", "ratios (target; met?):"]
    for r in rs:
        lines.append(f"  {r.name}: {r.value:.2f}  (target {r.target}: {'met' if r.met else 'NOT met'})")
    if not rs:
        lines.append("  none: no peer or no server row was available")
    lines += ["", "single stream vs memory-bandwidth floor of one decode step:"]
    for f in fl:
        lines.append(f"  {f['name']}: {f['single_stream_tok_s']:.1f} tok/s = {f['fraction_of_floor'] * 100:.0f}% "
                     f"of the {f['weights']} floor {f['floor_tok_s']:.0f} tok/s")
    load = meta["load_average"]
    lines += ["", f"load average (1, 5, 15 min): start {load['start']}, end {load['end']} on "
                  f"{meta['host']['cores']} cores ({meta['host']['cpu_capability']})"]
    return "\n".join(lines)


def write_json(path: Path, rows: list[Contestant], rs: list[Ratio], fl: list[dict[str, Any]], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "contestants": {c.key: c.to_dict() for c in rows}, "ratios": [r.to_dict() for r in rs],
           "floors": fl}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def write_chart(path: Path, rows: list[Contestant], meta: dict) -> bool:
    """A PNG with one bar chart per figure; False (and a log line) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("no chart: matplotlib is not installed (`pip install -e '.[bench]'`, which `make bench` does)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = meta["settings"]
    figures = (
        ("single_stream_tok_s", "single-stream decode (tok/s, higher is better)"),
        ("batched_tok_s", f"{s['streams']} streams total (tok/s, higher is better)"),
        ("ttft_s", f"time to first token, {s['ttft_prompt_tokens']}-token prompt (s, lower is better)"),
    )
    shown = [c for c in rows if c.available]
    fig, axes = plt.subplots(1, len(figures), figsize=(5 * len(figures), 4.5))
    for ax, (name, title) in zip(axes, figures, strict=True):
        values = [c.median(name) or 0.0 for c in shown]
        colors = ["tab:blue" if c.ours else "tab:gray" for c in shown]
        bars = ax.bar(range(len(shown)), values, color=colors)
        ax.bar_label(bars, fmt="%.2f" if name == "ttft_s" else "%.0f")
        ax.set_xticks(range(len(shown)), [c.name for c in shown], rotation=20, ha="right")
        ax.set_title(title, fontsize=10)
    load = meta["load_average"]
    fig.suptitle(f"make bench {meta['started_at']}: {s['threads']} threads, load average {load['start'][0]} "
                 f"-> {load['end'][0]} (blue: ours)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
