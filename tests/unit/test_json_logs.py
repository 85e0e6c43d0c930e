"""--json-output: every line a process writes to stderr is one JSON object, whatever printed it."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import logging, sys, warnings
from loguru import logger
from text_generation_server.utils.log import setup_logging

setup_logging("shard-0", json_output=%s)
logger.info("from loguru")
logging.getLogger("huggingface_hub").warning("from stdlib logging")
warnings.warn("from warnings")
from tqdm import tqdm
for _ in tqdm(range(3), desc="a progress bar"):
    pass
print("a stray print to stderr", file=sys.stderr)
own = logging.getLogger("transformers.like")
own.propagate = False
own.addHandler(logging.StreamHandler())  # a library's own handler, made after start-up
own.warning("from a library handler")
sys.stderr.write("\rframe 1\rframe 2\n")
"""


def run(json_output: bool) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT % json_output], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stderr.splitlines()


def test_json_output_turns_every_stderr_line_into_a_json_record_and_drops_progress_bars():
    lines = run(True)
    records = [json.loads(line)["record"] for line in lines]  # raises on any non-JSON line
    messages = [r["message"] for r in records]
    assert messages == [
        "from loguru",
        "from stdlib logging",
        messages[2],
        "a stray print to stderr",
        "from a library handler",
        "frame 2",
    ], messages
    assert "from warnings" in messages[2]
    assert all(r["extra"]["component"] == "shard-0" for r in records)
    assert [r["level"]["name"] for r in records[:2]] == ["INFO", "WARNING"]
    assert not any("progress bar" in m for m in messages)


def test_plain_output_keeps_library_lines_readable():
    lines = run(False)
    text = "\n".join(lines)
    assert "from loguru" in text and "from stdlib logging" in text and "a progress bar" in text
