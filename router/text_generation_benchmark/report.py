"""The benchmark's results as a table for people and a JSON document for programs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from text_generation_benchmark.measure import METRICS, Shape
from text_generation_benchmark.stats import Summary

COLUMNS = ("batch", "prompt", "new", "metric", "unit", "mean", "p50", "p90", "p99")


def _number(value: float) -> str:
    return f"{value:.2f}" if value < 1000 else f"{value:.0f}"


def table(results: list[tuple[Shape, dict[str, Summary | None]]]) -> str:
    """One row per shape and metric; a metric that does not apply shows ``-``."""
    labels = {key: (label, unit) for key, label, unit, _ in METRICS}
    rows = [COLUMNS]
    for shape, summaries in results:
        for key, _, _, _ in METRICS:
            label, unit = labels[key]
            s = summaries.get(key)
            numbers = ("-",) * 4 if s is None else tuple(_number(v) for v in (s.mean, s.p50, s.p90, s.p99))
            rows.append((str(shape.batch_size), str(shape.prompt_tokens), str(shape.new_tokens), label, unit, *numbers))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    numeric = {0, 1, 2, 5, 6, 7, 8}

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def document(
    *,
    target: dict[str, Any],
    settings: dict[str, Any],
    results: list[tuple[Shape, dict[str, Summary | None]]],
    load_average: dict[str, list[float]],
    started_at: str,
    duration_s: float,
) -> dict[str, Any]:
    """The JSON document: what was measured, under what load, and every metric's summary."""
    return {
        "tool": "text-generation-benchmark",
        "started_at": started_at,
        "duration_s": duration_s,
        "target": target,
        "settings": settings,
        "load_average": load_average,
        "units": {key: unit for key, _, unit, _ in METRICS},
        "results": [
            {
                **shape.to_dict(),
                "metrics": {key: (s.to_dict() if s is not None else None) for key, s in summaries.items()},
            }
            for shape, summaries in results
        ],
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
